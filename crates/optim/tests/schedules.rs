//! LR schedules against transformers 5.23's lambdas driven by torch's `LambdaLR`
//! (`fixtures/lr_schedules.safetensors`, 40 optimizer steps each, base lr 3e-4, past the end of
//! training on purpose). Both sides compute in f64 with the same operations, so equality is exact.

mod common;
use common::*;
use qlora_optim::LrSchedule;
use safetensors::SafeTensors;

#[test]
fn transformers_schedules_bit_exact() {
    let bytes = fixture("lr_schedules.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let base = 3e-4;
    let cases = [
        ("constant", LrSchedule::Constant { warmup: 0 }),
        ("constant_warmup5", LrSchedule::Constant { warmup: 5 }),
        (
            "linear_w0_t30",
            LrSchedule::Linear {
                warmup: 0,
                total: 30,
            },
        ),
        (
            "linear_w5_t30",
            LrSchedule::Linear {
                warmup: 5,
                total: 30,
            },
        ),
        (
            "cosine_w5_t30",
            LrSchedule::Cosine {
                warmup: 5,
                total: 30,
                num_cycles: 0.5,
                min_lr_rate: 0.0,
            },
        ),
        (
            "cosine_w0_t30_c1.5",
            LrSchedule::Cosine {
                warmup: 0,
                total: 30,
                num_cycles: 1.5,
                min_lr_rate: 0.0,
            },
        ),
        (
            "cosine_w3_t30_min0.1",
            LrSchedule::Cosine {
                warmup: 3,
                total: 30,
                num_cycles: 0.5,
                min_lr_rate: 0.1,
            },
        ),
    ];
    for (key, sched) in cases {
        let want = f64s(&st, key);
        assert_eq!(want.len(), 40);
        for (k, w) in want.iter().enumerate() {
            let got = sched.lr(base, k as u64);
            assert_eq!(
                got.to_bits(),
                w.to_bits(),
                "{key} step {k}: got {got:e}, want {w:e}"
            );
        }
    }
}

#[test]
fn names_and_warmup_shape() {
    let s = LrSchedule::from_name("linear", 10, 100).unwrap();
    assert_eq!(s.factor(0), 0.0, "transformers' warmup starts at 0");
    assert_eq!(s.factor(5), 0.5);
    assert_eq!(s.factor(10), 1.0);
    assert_eq!(s.factor(100), 0.0);
    assert_eq!(s.factor(1000), 0.0);
    let c = LrSchedule::from_name("cosine", 0, 100).unwrap();
    assert_eq!(c.factor(0), 1.0);
    assert!((c.factor(50) - 0.5).abs() < 1e-15);
    assert_eq!(
        LrSchedule::from_name("constant", 0, 1).unwrap().factor(7),
        1.0
    );
    let e = LrSchedule::from_name("exponential", 0, 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lr_scheduler") && e.contains("exponential"),
        "{e}"
    );
}
