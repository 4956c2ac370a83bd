//! Convert a `llama` GGUF file to a Hugging Face directory and print what was found:
//! `cargo run --release -p qlora-gguf --example gguf_convert -- FILE.gguf OUT_DIR [f32|bf16]`.

use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: gguf_convert FILE.gguf OUT_DIR [f32|bf16]");
        std::process::exit(2);
    }
    let dtype = match args.get(2).map(String::as_str) {
        None | Some("f32") => qlora_gguf::OutDtype::F32,
        Some("bf16") => qlora_gguf::OutDtype::BF16,
        Some(other) => {
            eprintln!("unknown dtype {other:?} (f32 or bf16)");
            std::process::exit(2);
        }
    };
    let t0 = Instant::now();
    match qlora_gguf::convert_to_hf(&PathBuf::from(&args[0]), &PathBuf::from(&args[1]), dtype) {
        Ok(s) => {
            println!("{:#?}", s.hparams);
            println!(
                "{} tensors, {} parameters, source types {:?}, tokenizer {}, {:.1} s",
                s.n_tensors,
                s.n_params,
                s.source_types,
                s.tokenizer_model,
                t0.elapsed().as_secs_f64()
            );
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
