//! CoMERA's rank-adaptive two-stage training (`tt.rank_adapt`): physical pruning keeps the
//! model's outputs and really shrinks parameters and optimizer state; a two-stage run through
//! the `frugal` binary prunes, logs its ranks and resumes exactly across a pruning; the late
//! stage picks its objective from the two gaps; bad `tt` keys are errors naming the key.

mod common;

use common::*;
use frugal_core::safetensors_io::SafetensorsFile;
use frugal_models::encoder::{EncoderConfig, IGNORE_INDEX};
use frugal_optim::{AdamW, AdamWConfig};
use frugal_train::comera::{self, Comera};
use frugal_train::config::{self, Config};
use frugal_train::encoder_model::{EncoderModel, Net};
use frugal_tt::{Objective, RankedCores, TtLayer};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The TT layers of an encoder, mutable, with the variables they live in.
fn parts(m: &mut EncoderModel) -> (Vec<(String, &mut dyn TtLayer)>, &tch::nn::VarStore) {
    m.tt_layers_mut()
}

fn tt_config() -> Config {
    let mut cfg = Config::default();
    cfg.model.kind = config::ModelKind::Encoder;
    cfg.model.size = "encoder-tiny".into();
    cfg.model.linear = frugal_models::LinearKind::Tt {
        rank: 6,
        order: 2,
        eps: None,
    };
    // And a TT word table (60 = [5, 4, 3] x 16 = [2, 2, 4] at order 3).
    cfg.model.embedding = frugal_models::EmbeddingKind::Tt {
        rank: 6,
        order: 3,
        eps: None,
    };
    cfg.tt.rank_adapt = true;
    cfg.tt.early_steps = 10;
    cfg.tt.rank_lr = 0.05;
    cfg.train.max_steps = 20;
    cfg.validate().unwrap();
    cfg
}

fn numel(ts: &[(String, Tensor)]) -> i64 {
    ts.iter().map(|(_, t)| t.numel() as i64).sum()
}

fn logits(m: &EncoderModel, ids: &Tensor) -> Tensor {
    let Net::Mlm(mlm) = &m.net else { panic!() };
    tch::no_grad(|| mlm.logits(ids, None, None))
}

/// Guarantee: physical pruning (through [`Comera::prune`]) of TT linear layers and a TT word
/// table (lookup and tied decoder) leaves the outputs of the masked
/// model unchanged within 1e-5 (f32), shrinks the cores, the model's parameter count and both
/// optimizers' state by exactly the pruned entries' share, keeps the surviving moments (the
/// old moments sliced), and training goes on with a finite loss.
#[test]
fn pruning_keeps_outputs_and_slices_parameters_and_state() {
    let cfg = tt_config();
    let shape = EncoderConfig::new(60, 16, 2, 2, 32, 32);
    let mut m = EncoderModel::new(&cfg.model_build(), &shape, None, Device::Cpu).unwrap();
    let params = frugal_models::weights::named_variables(&m.vs);
    let before_params = numel(&params);
    let (mut c, main) = {
        let (mut layers, _) = parts(&mut m);
        assert_eq!(
            layers.len(),
            13,
            "the word table, then 6 TT linears per block"
        );
        assert_eq!(layers[0].0, "bert.embeddings.word_embeddings");
        Comera::new(
            &cfg.tt,
            &cfg.optim,
            cfg.train.max_steps,
            &mut layers,
            params,
        )
        .unwrap()
    };
    assert!(main.iter().all(|(n, _)| !n.contains(".rank_vars.")));
    let mut opt = AdamW::new(main, AdamWConfig::default());
    let ids = Tensor::randint(60, [3, 12], (Kind::Int64, Device::Cpu));
    let labels = ids.where_scalarother(&ids.fmod(3).ne(0), IGNORE_INDEX);
    let step = |m: &mut EncoderModel, c: &mut Comera, opt: &mut AdamW, s: u64| -> f64 {
        let loss = {
            let Net::Mlm(mlm) = &m.net else { panic!() };
            mlm.mlm_loss(&ids, None, None, &labels)
        };
        let value = loss.double_value(&[]);
        let (term, o) = c.loss_term(s, &loss, &m.tt_layers());
        assert_eq!(o, Objective::LossPlusPenalty(0.01));
        term.unwrap().backward();
        opt.step().unwrap();
        opt.zero_grad();
        let (mut layers, vs) = parts(m);
        let r = c.after_step(s, opt, &mut layers, vs).unwrap();
        assert!(!r.pruned, "no pruning before the end of the early stage");
        value
    };
    for s in 1..=2 {
        assert!(step(&mut m, &mut c, &mut opt, s).is_finite());
    }
    // Prune two entries of the second bond of every layer, and one of the first bond of the
    // first layer (the word table).
    let mut kept_first = Vec::new();
    let mut first = String::new();
    {
        let (layers, _) = parts(&mut m);
        for (i, (_, l)) in layers.iter().enumerate() {
            let d = &l.ranked().rank_vars();
            tch::no_grad(|| {
                let _ = d[1].narrow(0, 0, 2).shallow_clone().fill_(1e-3);
                if i == 0 {
                    let _ = d[0].narrow(0, 1, 1).shallow_clone().fill_(-5e-3);
                }
            });
            if i == 0 {
                first = l.ranked().core_names()[1].clone();
                kept_first = l
                    .ranked()
                    .masks()
                    .iter()
                    .map(|mk| mk.nonzero().squeeze_dim(1))
                    .collect();
            }
        }
    }
    let core0 = first.as_str();
    let old_core = m.vs.variables()[core0].copy();
    let old_moment = opt
        .state_tensors()
        .into_iter()
        .find(|(n, _)| n == &format!("{core0}.exp_avg"))
        .unwrap()
        .1;
    let (tt_before, live) = {
        let l = m.tt_layers();
        (comera::stored_params(&l), comera::live_size(&l))
    };
    assert!(live < tt_before);
    let main_state = numel(&opt.state_tensors());
    let rank_state = numel(&c.rank_optimizer().state_tensors());
    let x = Tensor::randint(60, [2, 12], (Kind::Int64, Device::Cpu));
    let masked = logits(&m, &x);
    let pruned = {
        let (mut layers, vs) = parts(&mut m);
        c.prune(&mut opt, &mut layers, vs).unwrap()
    };
    assert!(pruned);
    let after = logits(&m, &x);
    let diff = (&after - &masked).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "outputs moved by {diff} after pruning");
    let l = m.tt_layers();
    assert_eq!(
        comera::stored_params(&l),
        live,
        "cores hold exactly the live size"
    );
    let after_params = numel(&frugal_models::weights::named_variables(&m.vs));
    // Rank variables: 13 layers lose 2 entries each, the first layer one more.
    let removed = (tt_before - live) + 13 * 2 + 1;
    assert_eq!(after_params, before_params - removed);
    // AdamW keeps two moments per element (and a step scalar per tensor).
    assert_eq!(
        numel(&opt.state_tensors()),
        main_state - 2 * (tt_before - live)
    );
    assert_eq!(
        numel(&c.rank_optimizer().state_tensors()),
        rank_state - 2 * (13 * 2 + 1)
    );
    // The surviving moments are the old ones, sliced like the core.
    let new_moment = opt
        .state_tensors()
        .into_iter()
        .find(|(n, _)| n == &format!("{core0}.exp_avg"))
        .unwrap()
        .1;
    let want = RankedCores::slice_core_state(&kept_first, 1, &old_moment);
    assert_eq!(new_moment.size(), want.size());
    assert!(new_moment.equal(&want));
    let new_core = m.vs.variables()[core0].copy();
    assert!(new_core.equal(&RankedCores::slice_core_state(&kept_first, 1, &old_core)));
    assert!(new_core.numel() < old_core.numel());
    // Training goes on over the new tensors.
    for s in 3..=4 {
        assert!(step(&mut m, &mut c, &mut opt, s).is_finite());
    }
    let moved = (m.vs.variables()[core0].copy() - &new_core)
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        moved > 0.0,
        "the pruned core is the one the optimizer steps"
    );
}

/// Settings of a tiny TT encoder with rank adaptation on the test corpus: early stage of 3
/// steps, a threshold (0.99) that the first rank-variable steps (lr 0.05) cross, so pruning
/// happens at once.
fn comera_settings(corpus: &Path, steps: u64) -> Vec<String> {
    let mut s = small_settings(corpus);
    s.extend(
        [
            "model.kind=\"encoder\"",
            "model.size=\"encoder-tiny\"",
            "model.linear.kind=\"tt\"",
            "model.linear.rank=6",
            "model.linear.order=2",
            "tt.rank_adapt=true",
            "tt.early_steps=3",
            "tt.threshold=0.99",
            "tt.rank_lr=0.05",
            "tt.prune_every=2",
            "tt.compression_target=0.5",
            "tt.loss_target=2.0",
            "train.keep_checkpoints=0",
            "train.eval_every=4",
        ]
        .map(String::from),
    );
    s.push(format!("train.max_steps={steps}"));
    s
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Elements of the tensors of a safetensors file whose names contain `part`.
fn file_numel(path: &Path, part: &str) -> i64 {
    let f = SafetensorsFile::open(path).unwrap();
    f.names()
        .iter()
        .filter(|n| n.contains(part))
        .map(|n| f.info(n).unwrap().0.iter().product::<i64>())
        .sum()
}

fn train(dir: &Path, out: &Path, sets: &[String]) {
    let o = run(train_cmd(dir, out, sets));
    assert!(o.status.success(), "training failed");
}

/// Guarantee: a two-stage run prunes at the end of the early stage: the ranks it logs shrink,
/// the checkpoint's cores and both optimizers' state files really get smaller, the logged
/// sizes agree with the files, every loss is finite, and `ranks.png` is drawn.
#[test]
fn two_stage_run_prunes_and_shrinks_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 20);
    let r = dir.path().join("run");
    let mut sets = comera_settings(&corpus, 6);
    sets.push("train.save_every=1".into());
    train(dir.path(), &r, &sets);
    let lines = metrics(&r);
    assert_eq!(lines.len(), 6);
    for l in &lines {
        assert!(l["loss"].as_f64().unwrap().is_finite(), "{l}");
        for k in [
            "tt_size",
            "tt_compression",
            "tt_stage",
            "tt_objective",
            "tt_params",
        ] {
            assert!(l.get(k).is_some(), "metrics line lacks {k}: {l}");
        }
    }
    let stage: Vec<&str> = lines
        .iter()
        .map(|l| l["tt_stage"].as_str().unwrap())
        .collect();
    assert_eq!(stage, ["early", "early", "early", "late", "late", "late"]);
    assert_eq!(lines[0]["tt_objective"], "loss+penalty");
    // Step 3 ends the early stage with a pruning: ranks logged, stored = live.
    let ranks = lines[2]["tt_ranks"]
        .as_object()
        .expect("tt_ranks after pruning");
    assert_eq!(ranks.len(), 12);
    let at = |i: usize, k: &str| lines[i][k].as_i64().unwrap();
    assert!(
        at(2, "tt_params") < at(1, "tt_params"),
        "no pruning at step 3"
    );
    assert_eq!(at(2, "tt_params"), at(2, "tt_size"));
    // compression = dense / live size, the dense count fixed.
    let dense = |i: usize| lines[i]["tt_compression"].as_f64().unwrap() * at(i, "tt_size") as f64;
    for i in 1..6 {
        assert!((dense(i) - dense(0)).abs() < 1e-6 * dense(0), "line {i}");
    }
    let ck = |s: u64, f: &str| r.join(format!("checkpoints/step-{s}/{f}"));
    let cores2 = file_numel(&ck(2, "model.safetensors"), ".cores.");
    let cores3 = file_numel(&ck(3, "model.safetensors"), ".cores.");
    assert_eq!(cores2, at(1, "tt_params"));
    assert_eq!(cores3, at(2, "tt_params"));
    assert!(cores3 < cores2);
    assert!(
        file_numel(&ck(3, "model.safetensors"), "") < file_numel(&ck(2, "model.safetensors"), "")
    );
    let opt2 = file_numel(&ck(2, "optimizer.safetensors"), ".cores.");
    let opt3 = file_numel(&ck(3, "optimizer.safetensors"), ".cores.");
    assert_eq!(
        opt2 - opt3,
        2 * (cores2 - cores3),
        "moments of the pruned entries gone"
    );
    let rank2 = file_numel(&ck(2, comera::TT_OPTIMIZER_FILE), "rank_vars");
    let rank3 = file_numel(&ck(3, comera::TT_OPTIMIZER_FILE), "rank_vars");
    assert!(rank3 < rank2, "rank-variable state {rank2} -> {rank3}");
    assert_eq!(file_numel(&ck(2, "optimizer.safetensors"), "rank_vars"), 0);
    // The late stage's size is latched into the trainer state.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck(4, "trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(
        state["tt_late_start_size"].as_f64(),
        Some(at(2, "tt_size") as f64)
    );
    assert!(r.join("ranks.png").is_file());
    let mem: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.join("memory.json")).unwrap()).unwrap();
    assert!(mem["tt"]["tt_ranks"].is_object());
}

/// Guarantee: a run resumed from a checkpoint taken after a pruning, in the late stage (pruned
/// shapes, sliced optimizer states, latched size), logs the losses, sizes and objectives of
/// the uninterrupted run, bit for bit, with gradient accumulation (so a size step's skipped
/// micro-batches are skipped alike).
#[test]
fn resume_across_a_pruning_gives_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    resume_across_a_pruning(dir.path(), &[]);
}

/// Guarantee: the same one loop adapts a llama model's TT ranks: its TT linear layers are
/// pruned at the end of the early stage (fewer stored core parameters, in the checkpoint too),
/// and a run resumed across the pruning is the uninterrupted run, bit for bit.
#[test]
fn llama_rank_adaptation_prunes_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let full =
        resume_across_a_pruning(dir.path(), &["model.kind=\"llama\"", "model.size=\"tiny\""]);
    let lines = metrics(&full);
    let params = |i: usize| lines[i]["tt_params"].as_i64().unwrap();
    assert!(
        params(2) < params(1),
        "no pruning at step 3: {} -> {}",
        params(1),
        params(2)
    );
    assert_eq!(params(2), lines[2]["tt_size"].as_i64().unwrap());
    let ranks = lines[2]["tt_ranks"].as_object().expect("tt_ranks");
    assert!(
        ranks.keys().all(|k| k.starts_with("model.layers.")),
        "{ranks:?}"
    );
    assert_eq!(ranks.len(), 2 * 7, "7 TT linears in each of 2 blocks");
}

/// Guarantee: a llama run with a TT word table (`model.embedding.kind = "tt"`) beside TT
/// linear layers adapts the table's ranks in the same loop: its `tt_ranks` entry shrinks at the
/// end of the early stage and its stored cores shrink in the checkpoint (whose metadata
/// describes it at the pruned ranks); a run resumed across the pruning is the uninterrupted
/// run, bit for bit; `frugal eval --run` and `frugal generate --run` (KV cache) work on the
/// pruned run.
#[test]
fn llama_tt_table_rank_adaptation_prunes_resumes_evaluates_generates() {
    let dir = tempfile::tempdir().unwrap();
    let full = resume_across_a_pruning(
        dir.path(),
        &[
            "model.kind=\"llama\"",
            "model.size=\"tiny\"",
            "model.embedding.kind=\"tt\"",
            "model.embedding.rank=6",
            "model.embedding.order=2",
        ],
    );
    let lines = metrics(&full);
    let params = |i: usize| lines[i]["tt_params"].as_i64().unwrap();
    assert!(params(2) < params(1), "no pruning at step 3");
    let ranks = lines[2]["tt_ranks"].as_object().expect("tt_ranks");
    assert_eq!(
        ranks.len(),
        1 + 2 * 7,
        "the table and 7 TT linears per block"
    );
    let table: Vec<i64> = serde_json::from_value(ranks["model.embed_tokens"].clone()).unwrap();
    assert!(table[1] < 6, "the table was not pruned: {table:?}");
    let ck = |s: u64| full.join(format!("checkpoints/step-{s}/model.safetensors"));
    let (before, after) = (
        file_numel(&ck(2), "model.embed_tokens.cores."),
        file_numel(&ck(4), "model.embed_tokens.cores."),
    );
    assert!(after < before, "stored table cores {before} -> {after}");
    let f = SafetensorsFile::open(&ck(4)).unwrap();
    let info = &frugal_models::weights::read_tt_metadata(&f).unwrap()["model.embed_tokens"];
    assert!(info.vocab.is_some());
    assert_eq!(
        info.ranks, table,
        "the checkpoint holds the table at its pruned ranks"
    );
    assert!(!f.names().contains(&"model.embed_tokens.weight".to_string()));

    let mut c = frugal(dir.path());
    c.arg("eval").arg("--run").arg(&full);
    let o = run(c);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["loss"].as_f64().unwrap().is_finite(), "{v}");
    let mut c = frugal(dir.path());
    c.args(["generate", "--run"]).arg(&full).args([
        "--prompt",
        "the model",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ]);
    let o = run(c);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("the model"));
}

/// Trains the TT encoder (with `extra` settings on top) with rank adaptation for 9 steps in
/// `dir`, then resumes a copy cut back to step 4 (after a pruning) and checks that both logged
/// and saved the same; returns the uninterrupted run.
fn resume_across_a_pruning(dir: &Path, extra: &[&str]) -> std::path::PathBuf {
    let corpus = corpus(dir, 20);
    let full = dir.join("full");
    let mut sets = comera_settings(&corpus, 9);
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets.extend(
        [
            "train.save_every=2",
            "train.grad_accum=2",
            "tt.loss_target=8.0",
        ]
        .map(String::from),
    );
    train(dir, &full, &sets);
    let part = dir.join("part");
    copy_dir(&full, &part);
    for s in [6, 8, 9] {
        std::fs::remove_dir_all(part.join(format!("checkpoints/step-{s}"))).unwrap();
    }
    std::fs::write(part.join("checkpoints/latest"), "step-4\n").unwrap();
    let out = run({
        let mut c = frugal(dir);
        c.arg("train").arg("--resume").arg(&part);
        c
    });
    assert!(out.status.success());
    let key = |run: &Path| -> Vec<String> {
        metrics(run)
            .iter()
            .map(|l| {
                format!(
                    "{} {} {} {} {}",
                    l["step"], l["loss"], l["tt_size"], l["tt_params"], l["tt_objective"]
                )
            })
            .collect()
    };
    let want = key(&full);
    assert_eq!(want.len(), 9);
    assert_eq!(key(&part), want);
    let a = SafetensorsFile::open(&full.join("checkpoints/step-9/model.safetensors")).unwrap();
    let b = SafetensorsFile::open(&part.join("checkpoints/step-9/model.safetensors")).unwrap();
    assert_eq!(a.names(), b.names());
    for n in a.names() {
        let (x, y) = (
            a.tensor(&n, Device::Cpu).unwrap(),
            b.tensor(&n, Device::Cpu).unwrap(),
        );
        assert!(x.equal(&y), "{n} differs after resume");
    }
    full
}

/// Guarantee: the late stage descends the size while it is relatively further from its target
/// than the loss (a far size target, a loss target above the loss: every late step is a size
/// step, and the main optimizer rests), and the loss otherwise (a size target
/// already met, a loss target far below the loss).
#[test]
fn late_stage_picks_size_or_loss_by_the_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 20);
    let objectives = |name: &str, extra: &[&str]| -> Vec<serde_json::Value> {
        let r = dir.path().join(name);
        let mut sets = comera_settings(&corpus, 6);
        sets.extend(extra.iter().map(|s| s.to_string()));
        train(dir.path(), &r, &sets);
        metrics(&r)
    };
    let size = objectives(
        "size",
        &[
            "tt.compression_target=0.01",
            "tt.loss_target=100.0",
            "tt.threshold=0.01",
            "tt.rank_lr=0.2",
        ],
    );
    for l in &size[3..] {
        assert_eq!(l["tt_objective"], "size", "{l}");
        assert_eq!(
            l["grad_norm"].as_f64(),
            Some(0.0),
            "main optimizer stepped: {l}"
        );
    }
    let target = size[3]["tt_size_target"].as_f64().unwrap();
    assert!((target - 0.01 * size[3]["tt_size"].as_f64().unwrap()).abs() < 1e-6);
    let loss = objectives(
        "loss",
        &["tt.compression_target=1.0", "tt.loss_target=0.01"],
    );
    for l in &loss[3..] {
        assert_eq!(l["tt_objective"], "loss", "{l}");
        assert!(l["grad_norm"].as_f64().unwrap() > 0.0);
    }
}

fn config_error(text: &str) -> String {
    config::from_table(toml::from_str(text).unwrap())
        .unwrap_err()
        .to_string()
}

/// Guarantee: bad `tt` settings are errors naming the key: a compression target outside
/// (0, 1], a rank learning rate that is not positive, rank adaptation without TT layers
/// (`model.linear`), or in a llama model with the block-by-block step (per-layer updates,
/// checkpointing, a chunked cross-entropy); a TT word table is accepted for llama and encoder
/// (alone enough for rank adaptation) and refused by key (`model.embedding`) for hgrn-bit,
/// adapter runs and a pretrained llama that ties its output head to the table; the defaults are
/// `frugal_tt`'s.
#[test]
fn bad_tt_keys_are_named() {
    let enc = "[model]\nkind = \"encoder\"\nsize = \"encoder-tiny\"\n";
    let tt = "linear = {kind = \"tt\", rank = 4, order = 2}\n";
    let err = config_error(&format!("{enc}{tt}[tt]\ncompression_target = 1.5\n"));
    assert!(err.starts_with("tt.compression_target:"), "{err}");
    let err = config_error(&format!("{enc}{tt}[tt]\ncompression_target = 0.0\n"));
    assert!(err.starts_with("tt.compression_target:"), "{err}");
    let err = config_error(&format!("{enc}{tt}[tt]\nrank_lr = -1.0\n"));
    assert!(err.starts_with("tt.rank_lr:"), "{err}");
    let err = config_error(&format!("{enc}[tt]\nrank_adapt = true\n"));
    assert!(err.starts_with("model.linear:"), "{err}");
    // A llama model adapts its TT ranks too, but not with the block-by-block step.
    config::from_table(toml::from_str(&format!("[model]\n{tt}[tt]\nrank_adapt = true\n")).unwrap())
        .unwrap();
    for (key, set) in [
        ("optim.layerwise", "[optim]\nlayerwise = true\n"),
        ("train.checkpointing", "[train]\ncheckpointing = true\n"),
        ("train.ce_chunk", "[train]\nce_chunk = 64\n"),
    ] {
        let err = config_error(&format!("[model]\n{tt}[tt]\nrank_adapt = true\n{set}"));
        assert!(err.starts_with(&format!("{key}:")), "{err}");
    }
    let table = "embedding = {kind = \"tt\", rank = 4, order = 2}\n";
    config::from_table(toml::from_str(&format!("[model]\n{table}")).unwrap()).unwrap();
    config::from_table(
        toml::from_str(&format!("[model]\n{table}[tt]\nrank_adapt = true\n")).unwrap(),
    )
    .unwrap();
    let err = config_error(&format!("[model]\nkind = \"hgrn-bit\"\n{table}"));
    assert!(err.starts_with("model.embedding:"), "{err}");
    let err = config_error(&format!("[model]\n{table}[adapter]\nkind = \"lora\"\n"));
    assert!(err.starts_with("model.embedding:"), "{err}");
    let err = config_error("[model]\nembedding = {kind = \"tt\", rank = 0}\n");
    assert!(err.starts_with("model.embedding.rank:"), "{err}");
    // A pretrained llama whose config.json ties the output head to the table.
    let tied = tempfile::tempdir().unwrap();
    let mut shape = frugal_models::llama::LlamaConfig::preset("tiny").unwrap();
    shape.tie_word_embeddings = true;
    std::fs::write(
        tied.path().join("config.json"),
        serde_json::to_string(&shape).unwrap(),
    )
    .unwrap();
    let mut c: Config =
        config::from_table(toml::from_str(&format!("[model]\n{table}")).unwrap()).unwrap();
    c.model.from_pretrained = tied.path().display().to_string();
    let err = c.llama_config(8192).unwrap_err().to_string();
    assert!(
        err.starts_with("model.embedding:") && err.contains("tie_word_embeddings"),
        "{err}"
    );
    let err = config_error(&format!("{enc}embedding = {{kind = \"tt\", order = 1}}\n"));
    assert!(err.starts_with("model.embedding.order:"), "{err}");
    // A TT table alone is enough for rank adaptation.
    config::from_table(toml::from_str(&format!("{enc}{table}[tt]\nrank_adapt = true\n")).unwrap())
        .unwrap();
    let err = config_error(&format!("{enc}{tt}[tt]\nrank_adaptation = true\n"));
    assert!(
        err.starts_with("tt") && err.contains("rank_adaptation"),
        "{err}"
    );
    let ok =
        config::from_table(toml::from_str(&format!("{enc}{tt}[tt]\nrank_adapt = true\n")).unwrap())
            .unwrap();
    let d = frugal_tt::ComeraConfig::default();
    assert_eq!(ok.tt.comera(), d);
    assert_eq!((ok.tt.rank_lr, ok.tt.prune_every), (1e-3, 0));
    // Through the binary: a clean one-line error before any training.
    let dir = tempfile::tempdir().unwrap();
    let corpus = corpus(dir.path(), 3);
    let mut sets = small_settings(&corpus);
    sets.extend(
        [
            "model.kind=\"encoder\"",
            "model.size=\"encoder-tiny\"",
            "tt.rank_adapt=true",
        ]
        .map(String::from),
    );
    let out = run(train_cmd(dir.path(), &dir.path().join("x"), &sets));
    assert_clean_error(&out, "model.linear");
}

/// Guarantee: `configs/encoder-comera.toml` and `configs/encoder-6-comera.toml` are valid and
/// run rank adaptation on TT layers whose modes factor the encoder's dimensions (the model
/// builds).
#[test]
fn shipped_configs_are_valid() {
    for name in ["encoder-comera.toml", "encoder-6-comera.toml"] {
        shipped_config_is_valid(name);
    }
}

fn shipped_config_is_valid(name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../configs")
        .join(name);
    let cfg = config::load(&path, &[]).unwrap();
    assert!(cfg.tt.rank_adapt);
    assert!(cfg.tt.early_steps < cfg.train.max_steps, "no late stage");
    let shape = cfg.encoder_config(4099).unwrap();
    let m = EncoderModel::new(&cfg.model_build(), &shape, None, Device::Cpu).unwrap();
    let layers = m.tt_layers();
    assert_eq!(layers.len(), 6 * shape.num_hidden_layers as usize);
    let ratio = comera::dense_params(&layers) as f64 / comera::stored_params(&layers) as f64;
    assert!(ratio > 5.0, "compression at rank 30: {ratio}");
}

/// Guarantee: a classifier started from a pruned TT checkpoint (`load_pretrained`) takes the
/// file's smaller ranks, for the TT linear layers and the TT word table, and the new cores are
/// the model's trainable variables (what the optimizer steps and a checkpoint saves), with the
/// masked model's encoder output unchanged.
#[test]
fn classifier_from_a_pruned_checkpoint_trains_the_pruned_cores() {
    let cfg = tt_config();
    let shape = EncoderConfig::new(60, 16, 2, 2, 32, 32);
    let mut m = EncoderModel::new(&cfg.model_build(), &shape, None, Device::Cpu).unwrap();
    {
        let (mut layers, vs) = parts(&mut m);
        for (_, l) in layers.iter_mut() {
            tch::no_grad(|| {
                let _ = l.ranked().rank_vars()[0].narrow(0, 0, 1).fill_(0.0);
            });
            l.prune(vs).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.safetensors");
    m.save(&file).unwrap();
    let pruned_ranks: Vec<Vec<i64>> = m
        .tt_layers()
        .iter()
        .map(|(_, l)| l.ranked().ranks())
        .collect();
    let ids = Tensor::randint(60, [2, 8], (Kind::Int64, Device::Cpu));
    let want = tch::no_grad(|| m.encoder().forward(&ids, None, None));

    let mut c = EncoderModel::new(&cfg.model_build(), &shape, Some(3), Device::Cpu).unwrap();
    c.load_pretrained(&file).unwrap();
    let got: Vec<Vec<i64>> = c
        .tt_layers()
        .iter()
        .map(|(_, l)| l.ranked().ranks())
        .collect();
    assert_eq!(got, pruned_ranks);
    let out = tch::no_grad(|| c.encoder().forward(&ids, None, None));
    assert!((out - want).abs().max().double_value(&[]) < 1e-6);
    let vars = c.vs.variables();
    let trainable: Vec<Tensor> = c.vs.trainable_variables();
    for (name, layer) in c.tt_layers() {
        let r = layer.ranked();
        for (n, core) in r.core_names().iter().zip(r.cores()) {
            let v = &vars[n];
            assert_eq!(v.size(), core.size(), "{name}: {n}");
            assert_eq!(v.data_ptr(), core.data_ptr(), "{n} is the layer's core");
            assert!(
                trainable.iter().any(|t| t.data_ptr() == core.data_ptr()),
                "{n} is trainable"
            );
        }
    }
    // As many trainable variables as named ones (none stale, none missing).
    assert_eq!(trainable.len(), vars.len());
}
