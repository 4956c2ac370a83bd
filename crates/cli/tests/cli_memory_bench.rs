//! `qlora memory` and `qlora bench` through the binary: the tiny model's plan against the hand
//! calculation (derived line by line in crates/train/tests/plan.rs), the table, a short CPU
//! bench, and clear errors.

use std::path::PathBuf;
use std::process::{Command, Output};

fn qlora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .output()
        .expect("run qlora")
}

fn tiny() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny-llama")
        .display()
        .to_string()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn tiny_model_json_matches_hand_calculation() {
    let dir = tiny();
    let o = qlora(&[
        "memory",
        "--model",
        &dir,
        "--batch-size",
        "2",
        "--seq-len",
        "8",
        "--rank",
        "4",
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    // N = 16 rows, f32, 256-byte blocks (crates/train/tests/plan.rs):
    // activations = rope 512 + h, tmp 2·4096 + 2 layer inputs 2·4096 + xf 4096 + rstdf 256
    //             + recomputed layer (6·4096 + 2·256 + 2·2048 + P 2048 + 3·11008 + 7·256 = 66048)
    //             + its input copy 4096 = 91392
    // scratch     = d_a, d_e, d_g 3·11008 + d_xn, tmp, d_o, d_q 4·4096 + d_k, d_v 2·2048
    //             + d_xf, d_h 2·4096 = 61696
    // loss        = lse (16,) f32 → one 256-byte block
    for (key, want) in [
        ("activations", 91392u64),
        ("scratch", 61696),
        ("loss", 256),
        ("nf4_codes", 45312),
        ("nf4_constants", 16760),
        ("adapter_params", 36992),
        ("optimizer_state", 74240),
        ("trainable_params", 9248),
    ] {
        assert_eq!(v[key].as_u64(), Some(want), "{key}");
    }
    assert_eq!(v["peak_phase"], "backward");
    assert_eq!(v["model"], dir.as_str());
}

#[test]
fn table_lists_every_line_and_the_total() {
    let o = qlora(&["memory", "--shape", "llama3-8b", "--seq-len", "2048"]);
    assert!(o.status.success(), "{o:?}");
    let s = stdout(&o);
    for label in [
        "NF4 weights: codes",
        "quantization constants",
        "unquantized weights",
        "adapter parameters",
        "adapter gradients",
        "optimizer state",
        "activations",
        "scratch",
        "loss",
        "workspace",
        "caching-pool overhead",
        "CUDA context",
        "total (predicted peak)",
    ] {
        assert!(s.contains(label), "{label} missing in\n{s}");
    }
    // llama3-8b NF4 codes: 32 layers × 6,979,321,856/32 projection weights / 2 bytes.
    assert!(s.contains("3489660928"), "{s}");
    // No checkpointing keeps every layer's activations: a larger plan.
    let total = |args: &[&str]| -> u64 {
        let mut a = vec!["memory", "--shape", "llama3-8b", "--json"];
        a.extend_from_slice(args);
        let o = qlora(&a);
        assert!(o.status.success(), "{o:?}");
        let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        v["total"].as_u64().unwrap()
    };
    assert!(total(&["--no-gradient-checkpointing"]) > total(&[]));
    assert!(total(&["--optimizer", "adamw8"]) < total(&[]));
    // The planned arena needs less than the caching pool (size classes, per-class reuse).
    assert!(total(&[]) < total(&["--caching-pool"]));
}

#[test]
fn bad_inputs_are_clear_errors() {
    for (args, want) in [
        (vec!["memory", "--shape", "llama9"], "llama9"),
        (
            vec!["memory", "--shape", "tiny", "--seq-len", "0"],
            "--seq-len",
        ),
        (
            vec!["memory", "--shape", "tiny", "--batch-size", "0"],
            "--batch-size",
        ),
        (
            vec!["memory", "--shape", "tiny", "--optimizer", "sgd"],
            "--optimizer",
        ),
        (vec!["memory", "--shape", "tiny", "--device", "tpu"], "tpu"),
        (
            vec![
                "memory",
                "--shape",
                "tiny",
                "--device",
                "cpu",
                "--device-dtype",
                "bf16",
            ],
            "f32",
        ),
        (
            vec!["memory", "--model", "/nonexistent/model"],
            "/nonexistent",
        ),
        (vec!["memory"], "--shape"),
    ] {
        let o = qlora(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn bench_runs_on_the_cpu_and_reports_json() {
    let o = qlora(&[
        "bench",
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--rank",
        "4",
        "--warmup",
        "1",
        "--steps",
        "2",
        "--peak-tflops",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["tokens_per_step"], 32);
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["mfu"].as_f64().unwrap() > 0.0);
    assert!(v["planned_peak_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["profile"].as_array().unwrap().len(), 10);
    // The table form prints the headline, the profile and the memory line.
    let o = qlora(&[
        "bench",
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--seq-len",
        "16",
        "--steps",
        "1",
    ]);
    assert!(o.status.success(), "{o:?}");
    let s = stdout(&o);
    for want in ["tokens/s", "profile", "linear", "optimizer", "peak memory"] {
        assert!(s.contains(want), "{want} missing in\n{s}");
    }
}

#[test]
fn bench_bad_inputs_are_clear_errors() {
    for (args, want) in [
        (
            vec!["bench", "--shape", "llama9", "--device", "cpu"],
            "llama9",
        ),
        (
            vec![
                "bench", "--shape", "tiny", "--device", "cpu", "--steps", "0",
            ],
            "--steps",
        ),
        (
            vec![
                "bench",
                "--shape",
                "tiny",
                "--device",
                "cpu",
                "--seq-len",
                "0",
            ],
            "--seq-len",
        ),
        (vec!["bench", "--shape", "tiny", "--device", "npu"], "npu"),
    ] {
        let o = qlora(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
