//! Dequantize one tensor of a GGUF file to raw little-endian f32 (ggml element order), or list
//! the tensors: `gguf_tensor FILE.gguf [TENSOR OUT.f32]`. For cross-checking against other
//! GGUF readers.

use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = || -> Result<(), String> {
        let f = qlora_gguf::GgufFile::open(Path::new(
            args.first()
                .ok_or("usage: gguf_tensor FILE.gguf [TENSOR OUT.f32]")?,
        ))
        .map_err(|e| e.to_string())?;
        match (args.get(1), args.get(2)) {
            (Some(name), Some(out)) => {
                let v = f.tensor_f32(name).map_err(|e| e.to_string())?;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                std::fs::write(out, bytes).map_err(|e| format!("{out}: {e}"))
            }
            _ => {
                for t in f.tensors() {
                    println!("{}\t{}\t{:?}", t.name, t.ty.name(), t.dims);
                }
                Ok(())
            }
        }
    };
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
