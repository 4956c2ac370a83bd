//! `qlora train | eval | merge | generate` through the binary: the no-argument demo, fixture
//! parity from the command line, resume, Ctrl-C, and a clear error (exit 1, no panic) for every
//! kind of bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn qlora(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run qlora")
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .canonicalize()
        .unwrap()
}

fn fx(rel: &str) -> String {
    fixtures().join(rel).display().to_string()
}

fn demo_data() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../train/assets/demo/train.jsonl")
        .canonicalize()
        .unwrap()
        .display()
        .to_string()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn assert_ok(o: &Output) -> String {
    let t = text(o);
    assert!(o.status.success(), "expected success: {t}");
    t
}

fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let t = text(o);
    assert_eq!(o.status.code(), Some(1), "exit code 1 expected: {t}");
    assert!(!t.contains("panicked"), "no panic: {t}");
    for n in needles {
        assert!(t.contains(n), "message should mention `{n}`: {t}");
    }
}

/// Step losses from a metrics.jsonl.
fn step_losses(path: &Path) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("tokens_per_s").is_some())
        .map(|v| v["loss"].as_f64().unwrap())
        .collect()
}

/// A short training run on the tiny model and the demo data, plus `extra` flags.
fn small_run(cwd: &Path, out: &str, extra: &[&str]) -> Output {
    let (m, d) = (fx("tiny-llama"), demo_data());
    let mut args = vec![
        "train",
        "--model",
        &m,
        "--data",
        &d,
        "--output-dir",
        out,
        "--lora-r",
        "4",
        "--batch-size",
        "4",
        "--max-seq-len",
        "64",
    ];
    // Defaults unless `extra` sets them (clap refuses a repeated flag).
    for (k, v) in [("--max-steps", "3"), ("--save-every", "0")] {
        if !extra.contains(&k) {
            args.extend([k, v]);
        }
    }
    args.extend_from_slice(extra);
    qlora(&args, cwd)
}

#[test]
fn no_argument_demo_trains_and_says_where() {
    let tmp = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let o = qlora(&["--threads", "2", "train"], tmp.path());
    let secs = t0.elapsed().as_secs_f64();
    let t = assert_ok(&o);
    for needle in [
        "trainable params",
        "NF4",
        "examples",
        "runs/tiny-demo/adapter",
        "runs/tiny-demo/loss.png",
    ] {
        assert!(
            t.contains(needle),
            "demo output should mention `{needle}`: {t}"
        );
    }
    let out = tmp.path().join("runs/tiny-demo");
    assert!(out.join("adapter/adapter_config.json").is_file());
    assert!(out.join("adapter/adapter_model.safetensors").is_file());
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let losses = step_losses(&out.join("metrics.jsonl"));
    assert!(losses.len() > 100);
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        last < first / 4.0,
        "loss should fall visibly: {first} → {last}"
    );
    eprintln!("demo: {secs:.1} s, loss {first:.3} → {last:.3}");
    assert!(secs < 60.0, "demo took {secs:.1} s");
}

/// The fp32 fixture run (tests/fixtures/qlora-fp32) from the command line: losses of the
/// 8 steps within 1e-5 of PyTorch's.
#[test]
fn fixture_run_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixtures().join("qlora-fp32/batch.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut jsonl = String::new();
    for s in 0..8 {
        let v = st.tensor(&format!("step{s}")).unwrap();
        let ids: Vec<i64> = v
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        for row in ids.chunks(v.shape()[1]) {
            jsonl.push_str(&serde_json::json!({ "input_ids": row }).to_string());
            jsonl.push('\n');
        }
    }
    std::fs::write(tmp.path().join("b.jsonl"), jsonl).unwrap();
    let (m, init) = (fx("tiny-llama"), fx("qlora-fp32/adapter_init"));
    let o = qlora(
        &[
            "train",
            "--model",
            &m,
            "--base",
            "dense",
            "--data",
            "b.jsonl",
            "--init-adapter",
            &init,
            "--lr",
            "5e-3",
            "--weight-decay",
            "0",
            "--max-grad-norm",
            "0",
            "--warmup-ratio",
            "0",
            "--max-steps",
            "8",
            "--batch-size",
            "4",
            "--max-seq-len",
            "32",
            "--shuffle",
            "false",
            "--save-every",
            "0",
            "--output-dir",
            "out",
        ],
        tmp.path(),
    );
    assert_ok(&o);
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("qlora-fp32/losses.json")).unwrap(),
    )
    .unwrap();
    let got = step_losses(&tmp.path().join("out/metrics.jsonl"));
    assert_eq!(got.len(), 8);
    for (i, g) in got.iter().enumerate() {
        let w = want["steps"][i]["loss"].as_f64().unwrap();
        assert!((g - w).abs() < 1e-5, "step {i}: {g} vs {w}");
    }
}

#[test]
fn resume_from_the_command_line_is_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let flags = [
        "--lr",
        "0.01",
        "--warmup-ratio",
        "0",
        "--lora-dropout",
        "0.1",
    ];
    let mut a = flags.to_vec();
    a.extend(["--max-steps", "6"]);
    assert_ok(&small_run(tmp.path(), "straight", &a));
    let mut b = flags.to_vec();
    b.extend(["--max-steps", "3", "--save-every", "3"]);
    assert_ok(&small_run(tmp.path(), "split", &b));
    let o = qlora(
        &[
            "train",
            "--resume",
            "split/checkpoint-3",
            "--max-steps",
            "6",
        ],
        tmp.path(),
    );
    let t = assert_ok(&o);
    assert!(t.contains("resuming"), "{t}");
    let la = step_losses(&tmp.path().join("straight/metrics.jsonl"));
    let lb = step_losses(&tmp.path().join("split/metrics.jsonl"));
    assert_eq!(la.len(), 6);
    assert_eq!(la, lb);
    let ad = |d: &str| std::fs::read(tmp.path().join(d).join("adapter/adapter_model.safetensors"));
    assert_eq!(ad("straight").unwrap(), ad("split").unwrap());
}

#[test]
fn ctrl_c_writes_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, d) = (fx("tiny-llama"), demo_data());
    let mut child = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args([
            "train",
            "--model",
            &m,
            "--data",
            &d,
            "--output-dir",
            "out",
            "--max-steps",
            "100000",
            "--save-every",
            "0",
            "--lora-r",
            "4",
        ])
        .current_dir(tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = tmp.path().join("out/metrics.jsonl");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&metrics).is_ok_and(|s| s.contains("tokens_per_s")) {
        if child.try_wait().unwrap().is_some() {
            panic!(
                "qlora exited early: {}",
                text(&child.wait_with_output().unwrap())
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "training never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(130), "{t}");
    assert!(t.contains("--resume"), "{t}");
    let ckpt = std::fs::read_dir(tmp.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("checkpoint-"))
        .expect("a checkpoint");
    for f in [
        "trainer_state.json",
        "optimizer.bin",
        "adapter_model.safetensors",
    ] {
        assert!(tmp.path().join("out").join(&ckpt).join(f).is_file(), "{f}");
    }
    assert!(
        !tmp.path().join("out/adapter").exists(),
        "not passed off as finished"
    );
}

/// `kill -9` mid-run loses only the steps after the last checkpoint: resuming from the output
/// directory (newest complete checkpoint) ends bit-identical to an uninterrupted run.
#[test]
fn kill_9_then_resume_matches_a_straight_run() {
    let tmp = tempfile::tempdir().unwrap();
    let flags = [
        "--max-steps",
        "200",
        "--save-every",
        "5",
        "--lr",
        "0.01",
        "--warmup-ratio",
        "0",
    ];
    assert_ok(&small_run(tmp.path(), "straight", &flags));
    let (m, d) = (fx("tiny-llama"), demo_data());
    let mut args = vec![
        "train",
        "--model",
        &m,
        "--data",
        &d,
        "--output-dir",
        "killed",
        "--lora-r",
        "4",
        "--batch-size",
        "4",
        "--max-seq-len",
        "64",
    ];
    args.extend(flags);
    let mut child = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(&args)
        .current_dir(tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !tmp.path().join("killed/checkpoint-5").is_dir() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "exited before a checkpoint"
        );
        assert!(t0.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !tmp.path().join("killed/adapter").exists(),
        "the run finished before it was killed; the test needs more steps"
    );
    let t = assert_ok(&qlora(&["train", "--resume", "killed"], tmp.path()));
    assert!(t.contains("resuming"), "{t}");
    let ad = |d: &str| std::fs::read(tmp.path().join(d).join("adapter/adapter_model.safetensors"));
    assert_eq!(ad("straight").unwrap(), ad("killed").unwrap());
    let la = step_losses(&tmp.path().join("straight/metrics.jsonl"));
    let lb = step_losses(&tmp.path().join("killed/metrics.jsonl"));
    assert_eq!(la, lb);
}

#[test]
fn merge_eval_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let (m, l) = (fx("tiny-llama"), fx("tiny-llama-lora"));
    let t = assert_ok(&qlora(
        &[
            "merge",
            "--model",
            &m,
            "--adapter",
            &l,
            "--output",
            "merged",
        ],
        tmp.path(),
    ));
    assert!(t.contains("merged 14 LoRA projections"), "{t}");
    let d = demo_data();
    let loss = |args: &[&str]| -> f64 {
        let t = assert_ok(&qlora(args, tmp.path()));
        let at = t.find("eval loss ").expect(&t) + "eval loss ".len();
        t[at..].split_whitespace().next().unwrap().parse().unwrap()
    };
    let merged = loss(&["eval", "--model", "merged", "--data", &d]);
    let unmerged = loss(&["eval", "--model", &m, "--adapter", &l, "--data", &d]);
    assert!((merged - unmerged).abs() < 1e-4, "{merged} vs {unmerged}");
    let o = qlora(
        &[
            "eval",
            "--model",
            &m,
            "--data",
            &d,
            "--dump-logits",
            "l.safetensors",
        ],
        tmp.path(),
    );
    assert_ok(&o);
    assert!(tmp.path().join("l.safetensors").is_file());
    let t = assert_ok(&qlora(
        &[
            "generate",
            "--model",
            &m,
            "--adapter",
            &l,
            "--prompt",
            "The",
            "--max-new-tokens",
            "5",
        ],
        tmp.path(),
    ));
    assert!(t.contains("prompt tokens"), "{t}");
    assert_clean_failure(
        &qlora(
            &["generate", "--model", &m, "--prompt", "hi", "--chat"],
            tmp.path(),
        ),
        &["chat template"],
    );
}

// ---- bad input: a clear message, exit 1, nothing passed off as finished

fn write(dir: &Path, name: &str, body: &str) -> String {
    std::fs::write(dir.join(name), body).unwrap();
    name.to_string()
}

fn train_on(cwd: &Path, data: &str, extra: &[&str]) -> Output {
    let m = fx("tiny-llama");
    let mut args = vec![
        "train",
        "--model",
        &m,
        "--data",
        data,
        "--output-dir",
        "out",
        "--max-steps",
        "1",
        "--save-every",
        "0",
    ];
    args.extend_from_slice(extra);
    qlora(&args, cwd)
}

#[test]
fn bad_data_files() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    assert_clean_failure(&train_on(p, "nope.jsonl", &[]), &["nope.jsonl"]);
    let empty = write(p, "empty.jsonl", "");
    assert_clean_failure(&train_on(p, &empty, &[]), &["empty.jsonl"]);
    let bad = write(
        p,
        "bad.jsonl",
        "{\"text\": \"one\"}\n{\"text\": \"two\"}\n{\"text\": oops}\n",
    );
    assert_clean_failure(&train_on(p, &bad, &[]), &["bad.jsonl", "3"]);
    let unknown = write(p, "unknown.jsonl", "{\"text\": \"ok\"}\n{\"foo\": 1}\n");
    assert_clean_failure(&train_on(p, &unknown, &[]), &["unknown.jsonl", "2"]);
    assert!(!p.join("out/adapter").exists());
}

#[test]
fn too_long_sequences_truncate_or_refuse() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    let long = write(
        p,
        "long.jsonl",
        "{\"text\": \"Quantize the model weight and train the adapter on the data.\"}\n",
    );
    let o = train_on(p, &long, &["--max-seq-len", "8"]);
    let t = assert_ok(&o);
    assert!(t.to_lowercase().contains("truncat"), "{t}");
    assert_clean_failure(
        &train_on(p, &long, &["--max-seq-len", "8", "--strict"]),
        &["long.jsonl", "8"],
    );
    // Longer than the model's 256 positions: refused up front.
    assert_clean_failure(
        &train_on(p, &long, &["--max-seq-len", "1000"]),
        &["max_seq_len", "256"],
    );
}

#[test]
fn tokenizer_too_large_for_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../train/tests/fixtures/data/chatml")
        .canonicalize()
        .unwrap();
    let o = train_on(
        tmp.path(),
        &demo_data(),
        &["--tokenizer", &tok.display().to_string()],
    );
    assert_clean_failure(&o, &["tokenizer.json", "320"]);
}

#[test]
fn adapter_for_another_model() {
    let tmp = tempfile::tempdir().unwrap();
    // tiny-llama-lora with its layer-1 tensors renamed to layer 7 (the model has 2 layers):
    // the header is edited in place (same length), the data is untouched.
    let src = fixtures().join("tiny-llama-lora");
    let dst = tmp.path().join("other");
    std::fs::create_dir(&dst).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        dst.join("adapter_config.json"),
    )
    .unwrap();
    let mut bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let header = header.replace("layers.1.", "layers.7.");
    bytes[8..8 + n].copy_from_slice(header.as_bytes());
    std::fs::write(dst.join("adapter_model.safetensors"), bytes).unwrap();
    let other = dst.display().to_string();
    assert_clean_failure(
        &train_on(tmp.path(), &demo_data(), &["--init-adapter", &other]),
        &["layers.7", "adapter_model.safetensors"],
    );
    let m = fx("tiny-llama");
    assert_clean_failure(
        &qlora(
            &[
                "eval",
                "--model",
                &m,
                "--adapter",
                &other,
                "--data",
                &demo_data(),
            ],
            tmp.path(),
        ),
        &["layers.7"],
    );
}

#[test]
fn invalid_config_values() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    let d = demo_data();
    assert_clean_failure(
        &train_on(p, &d, &["--lora-dropout", "1.5"]),
        &["lora_dropout"],
    );
    assert_clean_failure(&train_on(p, &d, &["--lr=-1"]), &["lr"]);
    assert_clean_failure(&train_on(p, &d, &["--lr-scheduler", "zigzag"]), &["zigzag"]);
    assert_clean_failure(&train_on(p, &d, &["--grad-accum", "0"]), &["grad_accum"]);
    if !gpu_usable() {
        // Explicit cuda without a GPU: a clear error with the reason, exit 1, nothing trained.
        assert_clean_failure(
            &train_on(p, &d, &["--device", "cuda"]),
            &["--device cuda", "no usable CUDA device ("],
        );
    }
    assert_clean_failure(&train_on(p, &d, &["--device", "tpu"]), &["device", "tpu"]);
    let cfg = write(p, "c.toml", "lora_rank = 8\n");
    assert_clean_failure(
        &train_on(p, &d, &["--config", &cfg]),
        &["lora_rank", "c.toml"],
    );
    let cfg = write(p, "t.toml", "lora_r = \"eight\"\n");
    assert_clean_failure(&train_on(p, &d, &["--config", &cfg]), &["lora_r"]);
    assert_clean_failure(&qlora(&["train", "--data", &d], p), &["no model"]);
}

#[test]
fn resume_refuses_other_data_and_non_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    assert_ok(&small_run(p, "run", &["--save-every", "3"]));
    let other = write(
        p,
        "other.jsonl",
        "{\"text\": \"something else entirely\"}\n",
    );
    assert_clean_failure(
        &qlora(
            &[
                "train",
                "--resume",
                "run",
                "--data",
                &other,
                "--max-steps",
                "6",
            ],
            p,
        ),
        &["different data"],
    );
    assert_clean_failure(
        &qlora(&["train", "--resume", "run/adapter"], p),
        &["run/adapter"],
    );
}

#[test]
fn nan_loss_stops_with_step_and_batch() {
    let tmp = tempfile::tempdir().unwrap();
    // A finished earlier run in the same directory must not leave its adapter behind.
    assert_ok(&small_run(tmp.path(), "out", &["--save-every", "1"]));
    assert!(tmp.path().join("out/adapter").is_dir());
    let o = small_run(
        tmp.path(),
        "out",
        &[
            "--lr",
            "1e30",
            "--max-grad-norm",
            "0",
            "--warmup-ratio",
            "0",
            "--max-steps",
            "10",
            "--save-every",
            "1",
        ],
    );
    assert_clean_failure(
        &o,
        &["step", "data lines", "last good checkpoint", "checkpoint-"],
    );
    assert!(!tmp.path().join("out/adapter").exists());
}

#[test]
fn help_lists_every_subcommand_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let t = assert_ok(&qlora(&["--help"], tmp.path()));
    for c in ["train", "eval", "merge", "generate"] {
        assert!(t.contains(c), "{t}");
    }
    let t = assert_ok(&qlora(&["train", "--help"], tmp.path()));
    for f in [
        "--config",
        "--resume",
        "--lora-r",
        "--grad-accum",
        "--packing",
        "--device",
    ] {
        assert!(t.contains(f), "{f}: {t}");
    }
    // Every key of the TOML config has a flag of the same name.
    let keys = serde_json::to_value(qlora_train::trainer::TrainConfig::default()).unwrap();
    for k in keys.as_object().unwrap().keys() {
        let flag = format!("--{}", k.replace('_', "-"));
        assert!(
            t.contains(&format!("{flag} ")),
            "no flag {flag} for key `{k}`"
        );
    }
}

#[test]
fn packing_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let t = assert_ok(&small_run(tmp.path(), "pk", &["--packing"]));
    assert!(t.contains("done: 3 steps"), "{t}");
    assert!(tmp
        .path()
        .join("pk/adapter/adapter_model.safetensors")
        .is_file());
}

/// Whether this machine has a GPU the CUDA backend can open (the device tests below assert
/// the behaviour of the machine they run on).
fn gpu_usable() -> bool {
    qlora_train::CudaBackend::new().is_ok()
}

#[test]
fn device_auto_falls_back_to_the_cpu_with_one_notice() {
    let tmp = tempfile::tempdir().unwrap();
    let t = assert_ok(&small_run(tmp.path(), "auto", &["--max-steps", "1"]));
    if gpu_usable() {
        assert!(t.contains("device     cuda-bf16"), "{t}");
        assert!(!t.contains("training on the CPU"), "{t}");
    } else {
        let notices: Vec<&str> = t
            .lines()
            .filter(|l| l.contains("training on the CPU"))
            .collect();
        assert_eq!(notices.len(), 1, "one notice line: {t}");
        assert!(
            notices[0].starts_with("no usable CUDA device ("),
            "the notice gives the reason: {t}"
        );
        assert!(t.contains("device     cpu"), "{t}");
    }
    assert!(t.contains("done: 1 steps"), "{t}");
    // An explicit cpu never looks for a GPU.
    let t = assert_ok(&small_run(
        tmp.path(),
        "cpu",
        &["--max-steps", "1", "--device", "cpu"],
    ));
    assert!(!t.contains("no usable CUDA device"), "{t}");
    assert!(t.contains("device     cpu"), "{t}");
}
