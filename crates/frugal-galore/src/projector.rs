//! [`GaloreProjector`]: galore-torch's `GaLoreProjector`, with its failure cases fixed and the
//! options described on the type.

use frugal_core::{Error, Result};
use tch::{Kind, Tensor};

use crate::config::{GaloreConfig, ProjType, SvdMethod};
use crate::svd::{self, Truncated};
use crate::GradientProjector;

/// The orthonormal factors a projector holds for one matrix.
#[derive(Debug)]
enum Basis {
    /// P = `U[:, :r]` (m x r): low = Pᵀ G.
    Left(Tensor),
    /// P = `Vh[:r]` (r x n): low = G Pᵀ.
    Right(Tensor),
    /// (`U[:, :r]`, `Vh[:r]`): low = Lᵀ G Rᵀ.
    Full(Tensor, Tensor),
}

/// Which factors a basis has, for a matrix of a given shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Left,
    Right,
    Full,
}

impl Side {
    fn of(proj_type: ProjType, m: i64, n: i64) -> Side {
        match proj_type {
            ProjType::Std if m >= n => Side::Right,
            ProjType::Std => Side::Left,
            ProjType::ReverseStd if m >= n => Side::Left,
            ProjType::ReverseStd => Side::Right,
            ProjType::Left => Side::Left,
            ProjType::Right => Side::Right,
            ProjType::Full => Side::Full,
        }
    }
}

impl Basis {
    /// The basis in `kind`, in contiguous tensors of their own: the SVD's factors are views
    /// of the full U and Vh, which would otherwise stay allocated (and a contiguous basis
    /// computes the same bits before and after a checkpoint round trip).
    fn from_svd(t: Truncated, side: Side, kind: Kind) -> Result<Basis> {
        let own = |x: &Tensor| -> Result<Tensor> {
            let mut out = Tensor::f_empty(x.size(), (kind, x.device()))?;
            out.f_copy_(x)?;
            Ok(out)
        };
        Ok(match side {
            Side::Left => Basis::Left(own(&t.u)?),
            Side::Right => Basis::Right(own(&t.vh)?),
            Side::Full => Basis::Full(own(&t.u)?, own(&t.vh)?),
        })
    }

    fn rank(&self) -> i64 {
        match self {
            Basis::Left(l) | Basis::Full(l, _) => l.size()[1],
            Basis::Right(r) => r.size()[0],
        }
    }

    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        match self {
            Basis::Left(p) | Basis::Right(p) => vec![("ortho", p)],
            Basis::Full(l, r) => vec![("ortho_left", l), ("ortho_right", r)],
        }
    }

    fn bytes(&self) -> u64 {
        self.tensors()
            .iter()
            .map(|(_, t)| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64)
            .sum()
    }

    /// |cos| between the top singular vectors of two bases (the smaller of the two sides for
    /// `Full`), in f64; `None` when the bases are not of the same side.
    fn top_agreement(&self, other: &Basis) -> Result<Option<f64>> {
        fn cos(a: &Tensor, b: &Tensor) -> Result<f64> {
            let a = a.f_to_kind(Kind::Double)?.f_flatten(0, -1)?;
            let b = b.f_to_kind(Kind::Double)?.f_flatten(0, -1)?;
            let dot = a.f_dot(&b)?.double_value(&[]);
            let na = a.f_norm()?.double_value(&[]);
            let nb = b.f_norm()?.double_value(&[]);
            if na == 0.0 || nb == 0.0 {
                return Ok(0.0);
            }
            Ok((dot / (na * nb)).abs())
        }
        let left_top = |l: &Tensor| l.f_narrow(1, 0, 1);
        let right_top = |r: &Tensor| r.f_narrow(0, 0, 1);
        Ok(match (self, other) {
            (Basis::Left(a), Basis::Left(b)) => Some(cos(&left_top(a)?, &left_top(b)?)?),
            (Basis::Right(a), Basis::Right(b)) => Some(cos(&right_top(a)?, &right_top(b)?)?),
            (Basis::Full(al, ar), Basis::Full(bl, br)) => Some(
                cos(&left_top(al)?, &left_top(bl)?)?.min(cos(&right_top(ar)?, &right_top(br)?)?),
            ),
            _ => None,
        })
    }
}

/// GaLore's gradient projector for one parameter (galore-torch's `GaLoreProjector`, same
/// arithmetic), usable alone or by an optimizer through [`GradientProjector`].
///
/// # Semantics
/// * A gradient of shape `(d0, d1, ...)` is read as the matrix `G = (d0, d1·d2·...)` (trailing
///   dims flattened; galore-torch only handles 2-D), and `project_back` restores the shape.
///   Gradients of fewer than 2 dims are an error.
/// * The side follows [`ProjType`]; the rank in use is `min(rank, m, n)`, so `reverse_std` on a
///   wide matrix with `rank >= m` works (galore-torch fails there).
/// * The basis is the truncated SVD of `G` in float32 (`G.float()`), cast back to the
///   gradient's kind; projections run in the gradient's kind, `project_back` returns the basis's
///   kind (the gradient's) times `scale`.
/// * Refresh: the first `project` computes a basis, whatever its step; later, the basis is
///   recomputed when `(step - anchor)` is a multiple of the gap, where the anchor is 0 and the
///   gap is `update_proj_gap` unless the lazy refresh moved them (so without it this is
///   galore-torch's `step % update_proj_gap == 0`). A second `project` at the step of the last
///   refresh does not recompute (gradient accumulation).
///
/// # SVD failures
/// A gradient holding NaN or Inf is not decomposed at all (an SVD of it would either fail or,
/// with Inf, return meaningless finite vectors). Otherwise a refresh tries, in order, until one
/// returns without error and with finite singular vectors: (1) the configured method in
/// float32 (for `exact`, galore-torch's computation); (2) the exact SVD in float64; (3) the
/// randomized SVD in float64 (the configured oversampling and power iterations, or 8 and 2).
/// When the gradient is not finite or all three fail, the previous basis is kept and a warning
/// goes to stderr (once per projector; the refresh counts as done for this step, the next one
/// is at the next scheduled step); when there is no previous basis (the first refresh),
/// `project` returns an error naming the tensor, its shape and what each attempt said.
///
/// # Lazy refresh (`lazy_refresh`, after Q-GaLore)
/// At every refresh that replaces a basis, the |cosine| between the new and the previous top
/// singular vector (`U[:, 0]` for left, `Vh[0]` for right, the smaller of the two for full;
/// absolute, because SVD signs are arbitrary) is appended to a window of the last
/// `lazy_window` values. When the window is full and its mean is at least `lazy_threshold`,
/// the gap doubles from this step on (anchor = this step, so the next refresh is at
/// step + 2·old gap) and the window is emptied, so each further doubling needs `lazy_window`
/// new agreeing comparisons. The gap never shrinks. (Q-GaLore compares the signed cosine and
/// keeps its queue; we differ there on purpose.)
///
/// # Moment re-projection (`reproject_moments`)
/// After a `project` that replaced a basis (and until the next `project` at another step),
/// with T the transition between the subspaces:
/// * left (`low` is r x n): T = P_newᵀ P_old (r x r), m' = T m, v' = (T∘T) v;
/// * right (`low` is m x r): T = P_old P_newᵀ, m' = m T, v' = v (T∘T);
/// * full: m' = T_L m T_R, v' = (T_L∘T_L) v (T_R∘T_R), T_L = L_newᵀ L_old, T_R = R_old R_newᵀ.
///
/// `m' = P_newᵀ (P_old m)` is the old moment seen in the new subspace. For the second moment,
/// ∘ is the element-wise product: if the old coordinates were independent with variances v,
/// a new coordinate `Σ_j T_ij x_j` has variance `Σ_j T_ij² v_j`, which is what v' holds; it is
/// non-negative whenever v is. The computation runs in float32 and returns the moment's kind.
/// A moment whose shape is not the projected shape gets `None`.
#[derive(Debug)]
pub struct GaloreProjector {
    config: GaloreConfig,
    name: String,
    basis: Option<Basis>,
    /// The basis replaced by the last refresh (kept only with `reproject_moments`).
    previous: Option<Basis>,
    /// The step of the refresh that replaced a basis, if any.
    changed_at: Option<i64>,
    /// The step of the last `project`.
    last_step: Option<i64>,
    /// The step of the last refresh (successful or not).
    last_refresh: Option<i64>,
    gap: i64,
    anchor: i64,
    /// Number of bases computed.
    refreshes: i64,
    /// The gradient's shape (empty until the first `project`).
    shape: Vec<i64>,
    /// Lazy refresh: the last |cos| values.
    agreement: Vec<f64>,
    warned: bool,
    /// Which attempt of the fallback chain gave the current basis.
    svd_used: Option<&'static str>,
    /// Attempts of the fallback chain made to fail (unit tests only set it).
    forced_failures: [bool; 3],
    /// Seconds spent computing bases so far.
    basis_seconds: f64,
}

impl GaloreProjector {
    /// A projector with `config` (validated), named "gradient" in messages.
    pub fn new(config: GaloreConfig) -> Result<Self> {
        config.validate()?;
        Ok(GaloreProjector {
            gap: config.update_proj_gap,
            config,
            name: "gradient".to_string(),
            basis: None,
            previous: None,
            changed_at: None,
            last_step: None,
            last_refresh: None,
            anchor: 0,
            refreshes: 0,
            shape: Vec::new(),
            agreement: Vec::new(),
            warned: false,
            svd_used: None,
            forced_failures: [false; 3],
            basis_seconds: 0.0,
        })
    }

    /// Names the parameter in errors and warnings (for example `layers.0.attn.q.weight`).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The settings.
    pub fn config(&self) -> &GaloreConfig {
        &self.config
    }

    /// The gap in use (`update_proj_gap`, doubled by the lazy refresh).
    pub fn gap(&self) -> i64 {
        self.gap
    }

    /// Number of bases computed so far (refreshes that kept the old basis do not count).
    pub fn refresh_count(&self) -> i64 {
        self.refreshes
    }

    /// The step of the last refresh, `None` before the first.
    pub fn last_refresh_step(&self) -> Option<i64> {
        self.last_refresh
    }

    /// Which SVD gave the current basis: `"float32 SVD"` (the configured method),
    /// `"float64 exact SVD"` or `"float64 randomized SVD"` (fallbacks, see the type's docs);
    /// `None` before the first basis or after [`GradientProjector::load_state`].
    pub fn svd_used(&self) -> Option<&'static str> {
        self.svd_used
    }

    /// The rank in use, `min(rank, m, n)`; `None` before the first `project`.
    pub fn rank_in_use(&self) -> Option<i64> {
        self.basis.as_ref().map(Basis::rank)
    }

    /// The left factor `U[:, :r]` (m x r) for `left` and `full` projections.
    pub fn left_basis(&self) -> Option<&Tensor> {
        match &self.basis {
            Some(Basis::Left(l)) | Some(Basis::Full(l, _)) => Some(l),
            _ => None,
        }
    }

    /// The right factor `Vh[:r]` (r x n) for `right` and `full` projections.
    pub fn right_basis(&self) -> Option<&Tensor> {
        match &self.basis {
            Some(Basis::Right(r)) | Some(Basis::Full(_, r)) => Some(r),
            _ => None,
        }
    }

    /// `(m, n)` of the matrix a gradient of `shape` is read as.
    fn matrix_dims(&self, shape: &[i64]) -> Result<(i64, i64)> {
        if shape.len() < 2 {
            return Err(Error::Msg(format!(
                "{}: GaLore projects gradients of 2 or more dims, got shape {shape:?}",
                self.name
            )));
        }
        let (m, n) = (shape[0], shape[1..].iter().product::<i64>());
        if m == 0 || n == 0 {
            return Err(Error::Msg(format!(
                "{}: cannot project an empty gradient of shape {shape:?}",
                self.name
            )));
        }
        Ok((m, n))
    }

    fn compute_basis(&self, g: &Tensor, side: Side, step: i64) -> Result<(Basis, &'static str)> {
        let rank = self.config.rank.min(g.size()[0]).min(g.size()[1]);
        if !svd::all_finite(g)? {
            return Err(Error::Msg(format!(
                "{}: the gradient {:?} holds NaN or Inf at step {step}, no SVD",
                self.name,
                g.size()
            )));
        }
        let g32 = g.f_to_kind(Kind::Float)?;
        let seed = svd::sketch_seed(self.config.seed, step);
        let (over, iters) = match self.config.svd {
            SvdMethod::Randomized {
                oversampling,
                power_iters,
            } => (oversampling, power_iters),
            SvdMethod::Exact => (8, 2),
        };
        let forced = |i: usize| -> Result<()> {
            if self.forced_failures[i] {
                return Err(Error::Msg("forced failure".into()));
            }
            Ok(())
        };
        let configured = || {
            forced(0)?;
            match self.config.svd {
                SvdMethod::Exact => svd::exact(&g32, rank),
                SvdMethod::Randomized { .. } => svd::randomized(&g32, rank, over, iters, seed),
            }
        };
        let exact64 = || {
            forced(1)?;
            svd::exact(&g.f_to_kind(Kind::Double)?, rank)
        };
        let randomized64 = || {
            forced(2)?;
            svd::randomized(&g.f_to_kind(Kind::Double)?, rank, over, iters, seed)
        };
        let attempts: [(&'static str, &dyn Fn() -> Result<Truncated>); 3] = [
            ("float32 SVD", &configured),
            ("float64 exact SVD", &exact64),
            ("float64 randomized SVD", &randomized64),
        ];
        match svd::first_success(&attempts) {
            Ok((i, t)) => Ok((Basis::from_svd(t, side, g.kind())?, attempts[i].0)),
            Err(why) => Err(Error::Msg(format!(
                "{}: SVD of the gradient {:?} failed at step {step} ({why})",
                self.name,
                g.size()
            ))),
        }
    }

    fn refresh(&mut self, g: &Tensor, side: Side, step: i64) -> Result<()> {
        self.last_refresh = Some(step);
        let started = std::time::Instant::now();
        let computed = self.compute_basis(g, side, step);
        self.basis_seconds += started.elapsed().as_secs_f64();
        let new = match computed {
            Ok((b, used)) => {
                self.svd_used = Some(used);
                b
            }
            Err(e) => {
                if self.basis.is_none() {
                    return Err(e);
                }
                if !self.warned {
                    eprintln!("warning: {e}; keeping the previous GaLore basis");
                    self.warned = true;
                }
                return Ok(());
            }
        };
        let agreement = match (&self.basis, self.config.lazy_refresh) {
            (Some(old), true) => new.top_agreement(old)?,
            _ => None,
        };
        self.refreshes += 1;
        let Some(old) = self.basis.replace(new) else {
            return Ok(());
        };
        if let Some(c) = agreement {
            self.agreement.push(c);
            let window = self.config.lazy_window as usize;
            if self.agreement.len() > window {
                self.agreement.remove(0);
            }
            let mean = self.agreement.iter().sum::<f64>() / self.agreement.len() as f64;
            if self.agreement.len() == window && mean >= self.config.lazy_threshold {
                self.gap = self.gap.saturating_mul(2);
                self.anchor = step;
                self.agreement.clear();
            }
        }
        if self.config.reproject_moments {
            self.previous = Some(old);
            self.changed_at = Some(step);
        }
        Ok(())
    }

    fn due(&self, step: i64) -> bool {
        self.basis.is_none()
            || ((step - self.anchor).rem_euclid(self.gap) == 0 && self.last_refresh != Some(step))
    }

    /// Shape of the projected gradient for the current basis and shape.
    fn low_shape(&self) -> Option<Vec<i64>> {
        let basis = self.basis.as_ref()?;
        let (m, n) = (self.shape[0], self.shape[1..].iter().product::<i64>());
        let r = basis.rank();
        Some(match basis {
            Basis::Left(_) => vec![r, n],
            Basis::Right(_) => vec![m, r],
            Basis::Full(..) => vec![r, r],
        })
    }

    fn reproject(&self, moment: &Tensor, square: bool) -> Result<Option<Tensor>> {
        if !self.config.reproject_moments || self.changed_at.is_none() {
            return Ok(None);
        }
        if self.changed_at != self.last_step {
            return Ok(None);
        }
        let (Some(old), Some(new)) = (&self.previous, &self.basis) else {
            return Ok(None);
        };
        if Some(moment.size()) != self.low_shape() {
            return Ok(None);
        }
        let f = |t: &Tensor| t.f_to_kind(Kind::Float);
        let sq = |t: Tensor| if square { t.f_square() } else { Ok(t) };
        let m = moment.f_to_kind(Kind::Float)?;
        let out = match (old, new) {
            (Basis::Left(po), Basis::Left(pn)) => {
                let t = sq(f(pn)?.f_transpose(0, 1)?.f_matmul(&f(po)?)?)?;
                t.f_matmul(&m)?
            }
            (Basis::Right(po), Basis::Right(pn)) => {
                let t = sq(f(po)?.f_matmul(&f(pn)?.f_transpose(0, 1)?)?)?;
                m.f_matmul(&t)?
            }
            (Basis::Full(lo, ro), Basis::Full(ln, rn)) => {
                let tl = sq(f(ln)?.f_transpose(0, 1)?.f_matmul(&f(lo)?)?)?;
                let tr = sq(f(ro)?.f_matmul(&f(rn)?.f_transpose(0, 1)?)?)?;
                tl.f_matmul(&m)?.f_matmul(&tr)?
            }
            _ => return Ok(None),
        };
        Ok(Some(out.f_to_kind(moment.kind())?))
    }

    fn scalar(v: i64) -> Tensor {
        Tensor::from_slice(&[v]).reshape([])
    }
}

impl GaloreProjector {
    /// `g` (2-D) projected with the current basis.
    fn apply(&self, g: &Tensor) -> Result<Tensor> {
        let kind = g.kind();
        let to = |p: &Tensor| p.f_to_kind(kind);
        let Some(basis) = self.basis.as_ref() else {
            return Err(Error::Msg(format!("{}: no GaLore basis", self.name)));
        };
        Ok(match basis {
            Basis::Left(p) => to(p)?.f_transpose(0, 1)?.f_matmul(g)?,
            Basis::Right(p) => g.f_matmul(&to(p)?.f_transpose(0, 1)?)?,
            Basis::Full(l, r) => to(l)?
                .f_transpose(0, 1)?
                .f_matmul(g)?
                .f_matmul(&to(r)?.f_transpose(0, 1)?)?,
        })
    }

    /// `low` mapped back to the parameter's shape through the basis (no scale).
    fn unproject(&self, low: &Tensor) -> Result<Tensor> {
        let (Some(basis), Some(expected)) = (self.basis.as_ref(), self.low_shape()) else {
            return Err(Error::Msg(format!(
                "{}: project_back before any project (no basis yet)",
                self.name
            )));
        };
        if low.size() != expected {
            return Err(Error::Shape {
                name: format!("{} (projected update)", self.name),
                expected,
                got: low.size(),
            });
        }
        let full = match basis {
            Basis::Left(p) => p.f_matmul(&low.f_to_kind(p.kind())?)?,
            Basis::Right(p) => low.f_to_kind(p.kind())?.f_matmul(p)?,
            Basis::Full(l, r) => l.f_matmul(&low.f_to_kind(l.kind())?)?.f_matmul(r)?,
        };
        Ok(full.f_reshape(&self.shape)?)
    }
}

impl GradientProjector for GaloreProjector {
    fn project(&mut self, grad: &Tensor, step: i64) -> Result<Tensor> {
        if step < 0 {
            return Err(Error::Msg(format!(
                "{}: the step must be >= 0, got {step}",
                self.name
            )));
        }
        let shape = grad.size();
        let (m, n) = self.matrix_dims(&shape)?;
        if self.basis.is_some() && shape != self.shape {
            return Err(Error::Shape {
                name: self.name.clone(),
                expected: self.shape.clone(),
                got: shape,
            });
        }
        let g = grad.f_reshape([m, n])?;
        let side = Side::of(self.config.proj_type, m, n);
        if self.last_step != Some(step) && self.changed_at.is_some() {
            // A new step: the last change is no longer news.
            self.previous = None;
            self.changed_at = None;
        }
        self.shape = shape;
        if self.due(step) {
            self.refresh(&g, side, step)?;
        }
        self.last_step = Some(step);
        self.apply(&g)
    }

    fn refresh_due(&self, step: i64) -> bool {
        self.due(step)
    }

    fn project_current(&self, grad: &Tensor) -> Option<Result<Tensor>> {
        self.basis.as_ref()?;
        let shape = grad.size();
        Some(if shape != self.shape {
            Err(Error::Shape {
                name: self.name.clone(),
                expected: self.shape.clone(),
                got: shape,
            })
        } else {
            self.matrix_dims(&shape)
                .and_then(|(m, n)| Ok(grad.f_reshape([m, n])?))
                .and_then(|g| self.apply(&g))
        })
    }

    fn lift(&self, low: &Tensor) -> Result<Tensor> {
        self.unproject(low)
    }

    fn project_back(&self, low: &Tensor) -> Result<Tensor> {
        Ok(self.unproject(low)?.f_mul_scalar(self.config.scale)?)
    }

    /// `weight += alpha * scale * P low` (or `low Q`, or `P low Q`) as one `addmm_` on the
    /// weight's memory, when the weight is a contiguous matrix of the basis' dtype; otherwise
    /// through [`GradientProjector::project_back`].
    fn add_back(&self, weight: &Tensor, low: &Tensor, alpha: f64) -> Result<()> {
        let (Some(basis), Some(expected)) = (self.basis.as_ref(), self.low_shape()) else {
            return Err(Error::Msg(format!(
                "{}: project_back before any project (no basis yet)",
                self.name
            )));
        };
        let kind = basis.tensors()[0].1.kind();
        let dims = self.matrix_dims(&weight.size());
        let (Ok((m, n)), true, true, true) = (
            dims,
            weight.is_contiguous() && weight.size() == self.shape,
            weight.kind() == kind,
            low.size() == expected,
        ) else {
            return crate::add_full_back(self, weight, low, alpha);
        };
        let low = low
            .f_to_kind(kind)?
            .f_mul_scalar(alpha * self.config.scale)?;
        let mut w = weight.f_view([m, n])?;
        let _ = match basis {
            Basis::Left(p) => w.f_addmm_(p, &low)?,
            Basis::Right(p) => w.f_addmm_(&low, p)?,
            Basis::Full(l, r) => w.f_addmm_(&l.f_matmul(&low)?, r)?,
        };
        Ok(())
    }

    fn moments_need_reprojection(&self) -> bool {
        self.config.reproject_moments
            && self.changed_at.is_some()
            && self.changed_at == self.last_step
            && self.previous.is_some()
            && self.basis.is_some()
    }

    fn reproject_first_moment(&self, moment: &Tensor) -> Option<Tensor> {
        self.reproject(moment, false).ok().flatten()
    }

    fn reproject_second_moment(&self, moment: &Tensor) -> Option<Tensor> {
        self.reproject(moment, true).ok().flatten()
    }

    fn state_tensors(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        if let Some(b) = &self.basis {
            for (name, t) in b.tensors() {
                out.push((format!("{prefix}.{name}"), t.shallow_clone()));
            }
        }
        if let Some(b) = &self.previous {
            for (name, t) in b.tensors() {
                out.push((format!("{prefix}.previous_{name}"), t.shallow_clone()));
            }
        }
        let opt = |v: Option<i64>| v.unwrap_or(-1);
        for (name, v) in [
            ("gap", self.gap),
            ("anchor", self.anchor),
            ("refreshes", self.refreshes),
            ("last_refresh", opt(self.last_refresh)),
            ("last_step", opt(self.last_step)),
            ("changed_at", opt(self.changed_at)),
        ] {
            out.push((format!("{prefix}.{name}"), Self::scalar(v)));
        }
        out.push((format!("{prefix}.shape"), Tensor::from_slice(&self.shape)));
        out.push((
            format!("{prefix}.agreement"),
            Tensor::from_slice(&self.agreement),
        ));
        out
    }

    fn load_state(&mut self, prefix: &str, get: &dyn Fn(&str) -> Option<Tensor>) -> Result<()> {
        let fetch = |name: &str| -> Result<Tensor> {
            let key = format!("{prefix}.{name}");
            get(&key).ok_or_else(|| {
                Error::Msg(format!("{}: GaLore state has no tensor '{key}'", self.name))
            })
        };
        let int = |name: &str| -> Result<i64> {
            let t = fetch(name)?;
            if t.dim() != 0 || t.kind() != Kind::Int64 {
                return Err(Error::Msg(format!(
                    "{}: '{prefix}.{name}' must be an int64 scalar, got {:?} of shape {:?}",
                    self.name,
                    t.kind(),
                    t.size()
                )));
            }
            Ok(t.int64_value(&[]))
        };
        let opt = |v: i64| (v >= 0).then_some(v);
        let gap = int("gap")?;
        if gap < 1 {
            return Err(Error::Msg(format!(
                "{}: '{prefix}.gap' must be >= 1, got {gap}",
                self.name
            )));
        }
        let (anchor, refreshes) = (int("anchor")?, int("refreshes")?);
        let last_refresh = opt(int("last_refresh")?);
        let (last_step, changed_at) = (opt(int("last_step")?), opt(int("changed_at")?));
        let shape_t = fetch("shape")?;
        let shape = Vec::<i64>::try_from(shape_t.f_to_kind(Kind::Int64)?.f_flatten(0, -1)?)?;
        let agreement_t = fetch("agreement")?;
        let agreement =
            Vec::<f64>::try_from(agreement_t.f_to_kind(Kind::Double)?.f_flatten(0, -1)?)?;

        let read_basis = |pre: &str, side: Side, m: i64, n: i64| -> Result<Option<Basis>> {
            let rank = self.config.rank.min(m).min(n);
            let check = |name: &str, expected: Vec<i64>| -> Result<Tensor> {
                let t = fetch(&format!("{pre}{name}"))?;
                if t.size() != expected {
                    return Err(Error::Shape {
                        name: format!("{prefix}.{pre}{name}"),
                        expected,
                        got: t.size(),
                    });
                }
                Ok(t)
            };
            let has = get(&format!("{prefix}.{pre}ortho")).is_some()
                || get(&format!("{prefix}.{pre}ortho_left")).is_some();
            if !has {
                return Ok(None);
            }
            Ok(Some(match side {
                Side::Left => Basis::Left(check("ortho", vec![m, rank])?),
                Side::Right => Basis::Right(check("ortho", vec![rank, n])?),
                Side::Full => Basis::Full(
                    check("ortho_left", vec![m, rank])?,
                    check("ortho_right", vec![rank, n])?,
                ),
            }))
        };

        let (basis, previous) = if shape.is_empty() {
            (None, None)
        } else {
            let (m, n) = self.matrix_dims(&shape)?;
            let side = Side::of(self.config.proj_type, m, n);
            let basis = read_basis("", side, m, n)?;
            if basis.is_none() {
                let name = if side == Side::Full {
                    "ortho_left"
                } else {
                    "ortho"
                };
                return Err(Error::Msg(format!(
                    "{}: GaLore state has no tensor '{prefix}.{name}'",
                    self.name
                )));
            }
            (basis, read_basis("previous_", side, m, n)?)
        };
        self.basis = basis;
        self.previous = previous;
        self.gap = gap;
        self.anchor = anchor;
        self.refreshes = refreshes;
        self.last_refresh = last_refresh;
        self.last_step = last_step;
        self.changed_at = if self.previous.is_some() {
            changed_at
        } else {
            None
        };
        self.shape = shape;
        self.agreement = agreement;
        self.svd_used = None;
        Ok(())
    }

    fn state_bytes(&self) -> u64 {
        self.basis.as_ref().map_or(0, Basis::bytes) + self.previous.as_ref().map_or(0, Basis::bytes)
    }

    fn basis_seconds(&self) -> f64 {
        self.basis_seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grad() -> Tensor {
        let values: Vec<f32> = (0..60)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        Tensor::from_slice(&values).reshape([12, 5])
    }

    /// Guarantee: `add_back` (one accumulating product into the weight) equals adding the
    /// scaled `project_back`, for left, right and two-sided bases; a weight of another dtype,
    /// or one the projector does not describe, takes the full-size path with the same result.
    #[test]
    fn add_back_equals_the_full_size_update() {
        for proj_type in [ProjType::Left, ProjType::Right, ProjType::Full] {
            let mut p = GaloreProjector::new(GaloreConfig {
                rank: 2,
                update_proj_gap: 10,
                scale: 0.25,
                proj_type,
                ..GaloreConfig::default()
            })
            .unwrap();
            let low = p.project(&grad(), 0).unwrap().randn_like();
            let w = grad() * 0.5 + 1.0;
            let want = &w + p.project_back(&low).unwrap() * -0.3;
            p.add_back(&w, &low, -0.3).unwrap();
            let d = (&w - &want).abs().max().double_value(&[]);
            assert!(d < 1e-6, "{proj_type:?}: {d}");
            // Another dtype: the full-size path.
            let w64 = (grad() * 0.5 + 1.0).to_kind(Kind::Double);
            p.add_back(&w64, &low, -0.3).unwrap();
            let d = (&w64.to_kind(Kind::Float) - &want)
                .abs()
                .max()
                .double_value(&[]);
            assert!(d < 1e-6, "{proj_type:?} f64: {d}");
        }
    }

    /// The fallback order: float32 (configured), then float64 exact, then float64 randomized,
    /// then the previous basis (or an error without one).
    #[test]
    fn fallback_chain_order() {
        let config = GaloreConfig {
            rank: 2,
            update_proj_gap: 1,
            ..GaloreConfig::default()
        };
        let expect = [
            ([false, false, false], Some("float32 SVD")),
            ([true, false, false], Some("float64 exact SVD")),
            ([true, true, false], Some("float64 randomized SVD")),
            ([true, true, true], None),
        ];
        for (forced, used) in expect {
            let mut p = GaloreProjector::new(config.clone()).unwrap().with_name("w");
            p.forced_failures = forced;
            let r = p.project(&grad(), 0);
            match used {
                Some(used) => {
                    assert_eq!(p.svd_used(), Some(used));
                    assert_eq!(r.unwrap().size(), vec![12, 2]);
                    // Every fallback finds the same subspace (P Pᵀ is sign-free).
                    let b = p.right_basis().unwrap();
                    let pp = b.transpose(0, 1).matmul(b);
                    let mut q = GaloreProjector::new(config.clone()).unwrap();
                    let _ = q.project(&grad(), 0).unwrap();
                    let c = q.right_basis().unwrap();
                    let d = (pp - c.transpose(0, 1).matmul(c))
                        .abs()
                        .max()
                        .double_value(&[]);
                    assert!(d < 1e-4, "{used}: {d}");
                }
                None => {
                    let e = r.unwrap_err().to_string();
                    assert!(e.contains("float32 SVD: forced failure"), "{e}");
                    assert!(e.contains("float64 randomized SVD: forced failure"), "{e}");
                }
            }
        }
        // With a previous basis, a total failure keeps it.
        let mut p = GaloreProjector::new(config).unwrap().with_name("w");
        let _ = p.project(&grad(), 0).unwrap();
        let before = p.right_basis().unwrap().copy();
        p.forced_failures = [true; 3];
        let _ = p.project(&(grad() * 2.0 + 1.0), 1).unwrap();
        assert!(p.right_basis().unwrap().equal(&before));
        assert!(p.warned);
        assert_eq!(p.refresh_count(), 1);
    }
}
