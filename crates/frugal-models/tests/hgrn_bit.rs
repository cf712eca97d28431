//! The MatMul-free LM (HGRN-bit): the scan equals the step-by-step recurrence; the whole-sequence
//! forward equals token-by-token generation with the recurrent state; every parameter gets a
//! gradient; the published shapes.

use frugal_models::hgrn_bit::{linear_scan, HgrnBit, HgrnBitConfig, Mixer, State};
use frugal_models::LinearKind;
use tch::{nn::VarStore, Device, Kind, Tensor};

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn tiny(mixer: Mixer) -> HgrnBitConfig {
    HgrnBitConfig {
        vocab_size: 50,
        hidden_size: 32,
        intermediate_size: 96,
        num_hidden_layers: 3,
        rms_norm_eps: 1e-6,
        mixer,
        initializer_range: 0.02,
    }
}

/// Guarantee: the Hillis-Steele scan gives `h_t = f_t h_{t-1} + i_t` as a loop over t does,
/// from zero and from a given state, for lengths that are and are not powers of two, and its
/// gradients are the loop's.
#[test]
fn scan_equals_the_step_loop() {
    tch::manual_seed(1);
    for t in [1, 2, 5, 8, 13] {
        let f = Tensor::rand([2, t, 6], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let i = Tensor::randn([2, t, 6], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let h0 = Tensor::randn([2, 6], (Kind::Double, Device::Cpu));
        for start in [None, Some(&h0)] {
            let scanned = linear_scan(&f, &i, start);
            let mut h = start.map_or_else(|| h0.zeros_like(), |h| h.shallow_clone());
            let mut steps = Vec::new();
            for s in 0..t {
                h = f.select(1, s) * &h + i.select(1, s);
                steps.push(h.shallow_clone());
            }
            let looped = Tensor::stack(&steps, 1);
            assert!(max_diff(&scanned, &looped) < 1e-12, "t {t}");
            let w = Tensor::randn([2, t, 6], (Kind::Double, Device::Cpu));
            let g1 = Tensor::run_backward(
                &[(&scanned * &w).sum(Kind::Double)],
                &[&f, &i],
                false,
                false,
            );
            let g2 =
                Tensor::run_backward(&[(&looped * &w).sum(Kind::Double)], &[&f, &i], false, false);
            for (a, b) in g1.iter().zip(&g2) {
                // A gradient the scan never needs (f of a single step from zero) is undefined:
                // zero.
                let a = if a.defined() {
                    a.shallow_clone()
                } else {
                    b.zeros_like()
                };
                assert!(max_diff(&a, b) < 1e-10, "t {t}: gradients");
            }
        }
    }
}

/// Guarantee: generating token by token with the recurrent state (constant memory per token)
/// gives the whole-sequence forward's logits within 1e-4, for both mixers, BitLinear and dense;
/// a prompt of several tokens followed by single tokens too.
#[test]
fn recurrent_generation_equals_the_full_forward() {
    for (mixer, kind) in [
        (Mixer::Reference, LinearKind::BitLinear { eps: 1e-8 }),
        (Mixer::Paper, LinearKind::BitLinear { eps: 1e-8 }),
        (Mixer::Reference, LinearKind::Dense),
    ] {
        tch::manual_seed(2);
        let vs = VarStore::new(Device::Cpu);
        let model = HgrnBit::new(&vs.root(), &tiny(mixer), &kind, Kind::Float).unwrap();
        // Non-trivial lower bounds.
        tch::no_grad(|| {
            let lb = &vs.variables()["model.lower_bounds"];
            let _ = lb.shallow_clone().copy_(&lb.randn_like());
        });
        let ids = Tensor::randint(50, [2, 9], (Kind::Int64, Device::Cpu));
        let full = tch::no_grad(|| model.forward(&ids, None));
        let mut state = State::default();
        let mut parts = vec![tch::no_grad(|| {
            model.forward(&ids.narrow(1, 0, 4), Some(&mut state))
        })];
        let bytes = state.bytes();
        for t in 4..9 {
            parts.push(tch::no_grad(|| {
                model.forward(&ids.narrow(1, t, 1), Some(&mut state))
            }));
            assert_eq!(state.bytes(), bytes, "the state does not grow");
        }
        let stepped = Tensor::cat(&parts, 1);
        let d = max_diff(&full, &stepped);
        assert!(d < 1e-4, "{mixer:?} {kind:?}: {d}");
        assert_eq!(bytes, 3 * 2 * 32 * 4, "one (B, d) f32 state per block");
    }
}

/// Guarantee: the loss reaches every parameter (latent weights, gains, lower bounds after the
/// first block, embeddings), and the variables have the reference code's names.
#[test]
fn every_parameter_gets_a_gradient() {
    tch::manual_seed(3);
    let vs = VarStore::new(Device::Cpu);
    let cfg = tiny(Mixer::Reference);
    let model = HgrnBit::new(
        &vs.root(),
        &cfg,
        &LinearKind::BitLinear { eps: 1e-8 },
        Kind::Float,
    )
    .unwrap();
    let ids = Tensor::randint(50, [2, 7], (Kind::Int64, Device::Cpu));
    let targets = Tensor::randint(50, [2, 7], (Kind::Int64, Device::Cpu));
    model.loss(&ids, &targets).backward();
    let vars = vs.variables();
    for name in [
        "model.embeddings.weight",
        "model.lower_bounds",
        "model.layers.0.attn_norm.weight",
        "model.layers.0.attn.i_proj.weight",
        "model.layers.0.attn.i_proj.norm.weight",
        "model.layers.1.attn.f_proj.weight",
        "model.layers.2.attn.g_norm.weight",
        "model.layers.2.attn.o_proj.weight",
        "model.layers.1.mlp_norm.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
        "lm_head.norm.weight",
    ] {
        let g = vars
            .get(name)
            .unwrap_or_else(|| panic!("no variable {name}"))
            .grad();
        assert!(
            g.defined() && g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "{name}"
        );
    }
    let n: i64 = vars.values().map(|t| t.numel() as i64).sum();
    assert_eq!(n, cfg.num_parameters());
}

/// Guarantee: the published shapes: 370M has about 370M parameters with a GLU width of 2816,
/// and the initialisation is the reference code's (token-mixer projections xavier-uniform with
/// gain 2^-2.5, GLU down projection scaled by 1/sqrt(2 layers)).
#[test]
fn published_shapes_and_init() {
    let c = HgrnBitConfig::preset("370m").unwrap();
    assert_eq!(c.intermediate_size, 2816);
    let n = c.num_parameters() as f64 / 1e6;
    assert!((360.0..380.0).contains(&n), "{n}M");
    assert_eq!(
        HgrnBitConfig::preset("1.3b").unwrap().intermediate_size,
        5632
    );
    assert_eq!(HgrnBitConfig::preset("2.7b").unwrap().num_hidden_layers, 32);

    tch::manual_seed(4);
    let vs = VarStore::new(Device::Cpu);
    let mut cfg = tiny(Mixer::Reference);
    cfg.hidden_size = 256;
    cfg.intermediate_size = 512;
    cfg.num_hidden_layers = 8;
    let _m = HgrnBit::new(
        &vs.root(),
        &cfg,
        &LinearKind::BitLinear { eps: 1e-8 },
        Kind::Float,
    )
    .unwrap();
    let v = vs.variables();
    let bound = 2f64.powf(-2.5) * (6.0 / 512.0f64).sqrt();
    let i = &v["model.layers.0.attn.i_proj.weight"];
    assert!(i.abs().max().double_value(&[]) <= bound + 1e-7);
    let std_i = i.std(true).double_value(&[]);
    assert!(
        (std_i - bound / 3f64.sqrt()).abs() < 0.1 * bound,
        "uniform: {std_i}"
    );
    let std_down = v["model.layers.0.mlp.down_proj.weight"]
        .std(true)
        .double_value(&[]);
    let want = 0.02 / 4.0;
    assert!(
        (std_down - want).abs() < 0.1 * want,
        "down_proj: {std_down} vs {want}"
    );
    let std_up = v["model.layers.0.mlp.gate_proj.weight"]
        .std(true)
        .double_value(&[]);
    assert!((std_up - 0.02).abs() < 0.002, "gate_proj: {std_up}");
}
