//! Tensor-train matrices: a matrix `(M, N)` with `M = m_1 ... m_d` and `N = n_1 ... n_d` as
//! cores `(r_{k-1}, m_k, n_k, r_k)`, so that
//! `W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] ... G_d[:, i_d, j_d, :]` (row and column
//! indices row-major over their modes).

use crate::modes::check_modes;
use crate::tt::{check_chain, contract_chain, ranks_of, Tt};
use frugal_core::{Error, Result};
use tch::Tensor;

/// A TT-matrix: `cores[k]` has shape `(r_{k-1}, m_k, n_k, r_k)`, `r_0 = r_d = 1`.
#[derive(Debug)]
pub struct TtMatrix {
    /// The cores, `(r_{k-1}, m_k, n_k, r_k)`.
    pub cores: Vec<Tensor>,
}

impl TtMatrix {
    /// A TT-matrix from cores; checks that each is 4-D and that the ranks chain with ends 1.
    pub fn from_cores(cores: Vec<Tensor>) -> Result<Self> {
        check_chain(&cores, 4, "TT-matrix")?;
        Ok(TtMatrix { cores })
    }

    /// TT-SVD of `matrix` `(M, N)` as a TT-matrix over `row_modes` (product M) and `col_modes`
    /// (product N, as many modes): the matrix is reshaped to `(m_1..m_d, n_1..n_d)`, permuted to
    /// the interleaved `(m_1 n_1, m_2 n_2, ...)` and decomposed by [`Tt::svd`] (same rank cap
    /// and relative accuracy; tensorly's `tensor_train_matrix` without `eps`).
    pub fn from_dense(
        matrix: &Tensor,
        row_modes: &[i64],
        col_modes: &[i64],
        max_rank: Option<i64>,
        eps: Option<f64>,
    ) -> Result<Self> {
        let size = matrix.size();
        if size.len() != 2 {
            return Err(Error::Msg(format!(
                "TT-matrix: input of shape {size:?} is not a matrix"
            )));
        }
        check_modes(row_modes, size[0], "TT-matrix rows")?;
        check_modes(col_modes, size[1], "TT-matrix columns")?;
        if row_modes.len() != col_modes.len() {
            return Err(Error::Msg(format!(
                "TT-matrix: row modes {row_modes:?} and column modes {col_modes:?} must have the \
                 same number of modes"
            )));
        }
        let d = row_modes.len() as i64;
        let mut split: Vec<i64> = row_modes.to_vec();
        split.extend_from_slice(col_modes);
        let perm: Vec<i64> = (0..d).flat_map(|k| [k, d + k]).collect();
        let merged: Vec<i64> = row_modes
            .iter()
            .zip(col_modes)
            .map(|(m, n)| m * n)
            .collect();
        let tensor = matrix.reshape(split).permute(perm).reshape(merged);
        let tt = Tt::svd(&tensor, max_rank, eps)?;
        let cores = tt
            .cores
            .into_iter()
            .enumerate()
            .map(|(k, c)| {
                let s = c.size();
                c.reshape([s[0], row_modes[k], col_modes[k], s[2]])
            })
            .collect();
        Ok(TtMatrix { cores })
    }

    /// The row modes `[m_1, ..., m_d]`.
    pub fn row_modes(&self) -> Vec<i64> {
        self.cores.iter().map(|c| c.size()[1]).collect()
    }

    /// The column modes `[n_1, ..., n_d]`.
    pub fn col_modes(&self) -> Vec<i64> {
        self.cores.iter().map(|c| c.size()[2]).collect()
    }

    /// The TT ranks `[1, r_1, ..., r_{d-1}, 1]`.
    pub fn ranks(&self) -> Vec<i64> {
        ranks_of(&self.cores)
    }

    /// The number of parameters, `sum_k r_{k-1} m_k n_k r_k`.
    pub fn num_params(&self) -> i64 {
        self.cores.iter().map(|c| c.numel() as i64).sum()
    }

    /// The full matrix `(M, N)` (differentiable, in the cores' kind).
    pub fn full(&self) -> Tensor {
        ttm_full(&self.cores)
    }
}

/// The full matrix `(M, N)` of TT-matrix cores `(r_{k-1}, m_k, n_k, r_k)`.
pub(crate) fn ttm_full(cores: &[Tensor]) -> Tensor {
    let rows: Vec<i64> = cores.iter().map(|c| c.size()[1]).collect();
    let cols: Vec<i64> = cores.iter().map(|c| c.size()[2]).collect();
    let d = cores.len() as i64;
    let mut interleaved = Vec::with_capacity(2 * cores.len());
    for (m, n) in rows.iter().zip(&cols) {
        interleaved.push(*m);
        interleaved.push(*n);
    }
    // (m_1, n_1, m_2, n_2, ...) -> (m_1, ..., m_d, n_1, ..., n_d).
    let perm: Vec<i64> = (0..d)
        .map(|k| 2 * k)
        .chain((0..d).map(|k| 2 * k + 1))
        .collect();
    contract_chain(cores)
        .reshape(interleaved)
        .permute(perm)
        .reshape([rows.iter().product::<i64>(), cols.iter().product::<i64>()])
}
