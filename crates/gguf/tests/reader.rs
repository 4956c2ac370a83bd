//! The GGUF parser: round trips through the test writer, alignment, and typed errors (naming
//! the file and the key or tensor) for every kind of corrupt or truncated input.

use qlora_gguf::writer::GgufWriter;
use qlora_gguf::{is_gguf, GgmlType, GgufError, GgufFile, Value, ValueType};

fn sample() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.kv("general.architecture", Value::String("llama".into()))
        .kv("t.u8", Value::U8(200))
        .kv("t.i8", Value::I8(-5))
        .kv("t.u16", Value::U16(65535))
        .kv("t.i16", Value::I16(-300))
        .kv("t.u32", Value::U32(4_000_000_000))
        .kv("t.i32", Value::I32(-7))
        .kv("t.u64", Value::U64(1 << 40))
        .kv("t.i64", Value::I64(-(1 << 40)))
        .kv("t.f32", Value::F32(1.25))
        .kv("t.f64", Value::F64(-2.5))
        .kv("t.bool", Value::Bool(true))
        .kv("t.str", Value::String("héllo ▁ world".into()))
        .kv(
            "t.arr_str",
            Value::Array(
                ValueType::String,
                vec![Value::String("a".into()), Value::String("b c".into())],
            ),
        )
        .kv("t.arr_empty", Value::Array(ValueType::I32, vec![]))
        .kv(
            "t.arr_nested",
            Value::Array(
                ValueType::Array,
                vec![Value::Array(ValueType::F32, vec![Value::F32(0.5)])],
            ),
        );
    // 2×3 f32 (HF shape [2, 3], ggml dims [3, 2]) and one Q8_0 block (32 elements, d = 1,
    // qs[j] = j → y[j] = j).
    w.tensor_f32("a", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let mut q = 0x3C00u16.to_le_bytes().to_vec();
    q.extend(0..32u8);
    w.tensor("b", &[32], GgmlType::Q8_0, q);
    w
}

fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn round_trip_of_every_value_type_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    for version in [2u32, 3] {
        let mut w = sample();
        w.version = version;
        let w = w;
        let p = write(&dir, "s.gguf", &w.to_bytes());
        assert!(is_gguf(&p));
        assert!(!is_gguf(dir.path()), "a directory is not GGUF");
        assert!(!is_gguf(&dir.path().join("missing.gguf")));
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.metadata(), &w.metadata[..]);
        assert_eq!(f.alignment(), 32);
        assert_eq!(f.data_start() % 32, 0);
        assert_eq!(f.str("general.architecture").unwrap(), "llama");
        assert_eq!(f.u64("t.u32").unwrap(), 4_000_000_000);
        assert!(f.get_u64("t.i8").is_err(), "negative is not a u64");
        assert_eq!(f.get_f32("t.f64").unwrap(), Some(-2.5));
        assert_eq!(
            f.get_str_array("t.arr_str").unwrap().unwrap(),
            vec!["a", "b c"]
        );
        let a = f.tensor("a").unwrap();
        assert_eq!(a.dims, vec![3, 2]);
        assert_eq!(a.shape(), vec![2, 3]);
        assert_eq!(
            f.tensor_f32("a").unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        let b = f.tensor_f32("b").unwrap();
        assert_eq!(b, (0..32).map(|j| j as f32).collect::<Vec<_>>());
        // Every tensor starts at an aligned offset.
        assert!(f.tensors().iter().all(|t| t.offset % 32 == 0));
    }
}

#[test]
fn alignment_comes_from_general_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = sample();
    w.kv("general.alignment", Value::U32(256));
    let p = write(&dir, "a.gguf", &w.to_bytes());
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.alignment(), 256);
    assert_eq!(f.data_start() % 256, 0);
    assert_eq!(f.tensor("b").unwrap().offset, 256);
    assert_eq!(f.tensor_f32("b").unwrap()[31], 31.0);

    // Reading the same bytes with the default alignment would land in the padding: a file
    // whose tensor offset is not a multiple of its alignment is refused, naming the tensor.
    let mut w = sample();
    w.kv("general.alignment", Value::U32(64));
    let mut bytes = w.to_bytes();
    // Patch tensor b's offset from 64 to 32: its entry is the name (u64 length 1, "b"), then
    // u32 n_dims = 1, u64 dim, u32 type, u64 offset.
    let mut name = 1u64.to_le_bytes().to_vec();
    name.push(b'b');
    let pos = bytes.windows(9).position(|x| x == name).unwrap() + 9 + 4 + 8 + 4;
    assert_eq!(bytes[pos..pos + 8], 64u64.to_le_bytes());
    bytes[pos..pos + 8].copy_from_slice(&32u64.to_le_bytes());
    let p = write(&dir, "b.gguf", &bytes);
    let err = GgufFile::open(&p).err().unwrap();
    assert!(
        matches!(&err, GgufError::Tensor { tensor, .. } if tensor == "b"),
        "{err}"
    );
    assert!(err.to_string().contains("alignment 64"), "{err}");

    let mut w = sample();
    w.kv("general.alignment", Value::U32(48));
    let p = write(&dir, "c.gguf", &w.to_bytes());
    let err = GgufFile::open(&p).err().unwrap();
    assert!(
        matches!(&err, GgufError::Metadata { key, .. } if key == "general.alignment"),
        "{err}"
    );
}

#[test]
fn every_truncation_is_a_typed_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let full = sample().to_bytes();
    // The last tensor's data ends 32 bytes + padding before the end; every strictly shorter
    // prefix must be refused (never a panic, never a silent success).
    let data_end = {
        let p = write(&dir, "full.gguf", &full);
        let f = GgufFile::open(&p).unwrap();
        let b = f.tensor("b").unwrap();
        (f.data_start() + b.offset + 34) as usize
    };
    for len in 0..data_end {
        let p = write(&dir, "t.gguf", &full[..len]);
        match GgufFile::open(&p) {
            Ok(_) => panic!("prefix of {len} bytes was accepted"),
            Err(e) => {
                let s = e.to_string();
                assert!(s.contains("t.gguf"), "{s}");
            }
        }
    }
    // A cut inside tensor b's data names b.
    let p = write(&dir, "t.gguf", &full[..data_end - 1]);
    let err = GgufFile::open(&p).err().unwrap();
    assert!(err.to_string().contains("tensor `b`"), "{err}");
    // A cut inside the metadata names the key being read.
    let key_pos = full.windows(5).position(|x| x == b"t.str").unwrap();
    let p = write(&dir, "t.gguf", &full[..key_pos + 5 + 4 + 8 + 3]);
    let err = GgufFile::open(&p).err().unwrap();
    assert!(err.to_string().contains("`t.str`"), "{err}");
}

#[test]
fn corrupt_headers_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let full = sample().to_bytes();

    let mut b = full.clone();
    b[0] = b'X';
    let err = GgufFile::open(&write(&dir, "m.gguf", &b)).err().unwrap();
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");

    let mut b = full.clone();
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    let err = GgufFile::open(&write(&dir, "v.gguf", &b)).err().unwrap();
    assert!(
        matches!(err, GgufError::UnsupportedVersion { version: 1, .. }),
        "{err}"
    );

    let mut b = full.clone();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    let err = GgufFile::open(&write(&dir, "be.gguf", &b)).err().unwrap();
    assert!(err.to_string().contains("big-endian"), "{err}");

    // Unknown value type tag on key `t.u8` (its tag follows the key bytes).
    let mut b = full.clone();
    let k = b.windows(4).position(|x| x == b"t.u8").unwrap() + 4;
    b[k..k + 4].copy_from_slice(&99u32.to_le_bytes());
    let err = GgufFile::open(&write(&dir, "k.gguf", &b)).err().unwrap();
    assert!(err.to_string().contains("`t.u8`"), "{err}");
    assert!(err.to_string().contains("unknown value type 99"), "{err}");

    // A bool byte that is neither 0 nor 1.
    let mut b = full.clone();
    let k = b.windows(6).position(|x| x == b"t.bool").unwrap() + 6 + 4;
    b[k] = 7;
    let err = GgufFile::open(&write(&dir, "b.gguf", &b)).err().unwrap();
    assert!(err.to_string().contains("`t.bool`"), "{err}");

    // An absurd array length is refused before allocating.
    let mut b = full.clone();
    let k = b.windows(9).position(|x| x == b"t.arr_str").unwrap() + 9 + 4 + 4;
    b[k..k + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let err = GgufFile::open(&write(&dir, "a.gguf", &b)).err().unwrap();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("`t.arr_str`"), "{err}");

    // Invalid UTF-8 in a string value.
    let mut b = full.clone();
    let k = b.windows(2).position(|x| x == "é".as_bytes()).unwrap();
    b[k] = 0xFF;
    let err = GgufFile::open(&write(&dir, "u.gguf", &b)).err().unwrap();
    assert!(err.to_string().contains("UTF-8"), "{err}");

    // Tensor dims whose product overflows.
    let mut w = sample();
    w.tensor("huge", &[1 << 40, 1 << 40], GgmlType::F32, vec![]);
    let err = GgufFile::open(&write(&dir, "o.gguf", &w.to_bytes()))
        .err()
        .unwrap();
    assert!(
        matches!(&err, GgufError::Tensor { tensor, .. } if tensor == "huge"),
        "{err}"
    );

    // A Q4_0 row that is not a whole number of blocks.
    let mut w = sample();
    w.tensor("odd", &[16], GgmlType::Q4_0, vec![0; 9]);
    let err = GgufFile::open(&write(&dir, "r.gguf", &w.to_bytes()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("`odd`"), "{err}");

    // Duplicate tensor names.
    let mut w = sample();
    w.tensor_f32("a", &[1], &[0.0]);
    let err = GgufFile::open(&write(&dir, "d.gguf", &w.to_bytes()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("twice"), "{err}");
}

#[test]
fn unsupported_tensor_type_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = sample();
    // Q2_K (ggml type 10): 84 bytes per 256 elements; the parser accepts the entry (its size is
    // unknown to us) but reading it names the type.
    w.tensor("q2", &[256], GgmlType::from_id(10), vec![0; 84]);
    let f = GgufFile::open(&write(&dir, "q.gguf", &w.to_bytes())).unwrap();
    let err = f.tensor_f32("q2").unwrap_err();
    assert!(
        matches!(&err, GgufError::UnsupportedType { tensor, ty, .. } if tensor == "q2" && ty == "Q2_K"),
        "{err}"
    );
    let err = f.tensor_f32("nope").unwrap_err();
    assert!(err.to_string().contains("`nope`"), "{err}");
}
