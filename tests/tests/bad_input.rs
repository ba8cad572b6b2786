//! Bad models and bad requests give clear errors, never a panic.

use std::io::Write;

use sovra_model::synthetic::SyntheticLlama;
use sovra_model::{
    ForwardError, GgufModel, LayerRange, LlamaSlice, LoadError, ModelTokenizer, SamplingParams,
    SegmentInput, SessionCache, SliceInput, StopConditions, WeightMode,
};
use sovra_tests::*;
use sovra_worker::{GenerateError, GenerateRequest, LocalPipeline, generate};

fn write_prefix(bytes: usize) -> tempfile::NamedTempFile {
    let data = std::fs::read(smollm2_path()).unwrap();
    let mut file = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
    file.write_all(&data[..bytes]).unwrap();
    file
}

#[test]
fn truncated_header_is_an_invalid_gguf() {
    let file = write_prefix(4096);
    let err = GgufModel::open(file.path()).unwrap_err();
    assert!(matches!(err, LoadError::InvalidGguf { .. }), "{err}");
    assert!(err.to_string().contains("not a valid GGUF file"), "{err}");
}

#[test]
fn truncated_tensor_data_is_refused_at_open() {
    let len = std::fs::metadata(smollm2_path()).unwrap().len() as usize;
    for cut in [len / 2, len - 1] {
        let file = write_prefix(cut);
        let err = GgufModel::open(file.path()).unwrap_err();
        assert!(matches!(err, LoadError::InvalidGguf { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("truncated") && text.contains(&format!("the file has {cut} bytes")),
            "{text}"
        );
    }
    assert!(GgufModel::open(write_prefix(len).path()).is_ok());
}

#[test]
fn tensor_data_cut_after_open_names_the_tensor() {
    let len = std::fs::metadata(smollm2_path()).unwrap().len() as usize;
    let file = write_prefix(len);
    let model = GgufModel::open(file.path()).expect("the whole file");
    // The file shrinks under the model (replaced while a worker loads it).
    file.as_file().set_len(len as u64 / 2).unwrap();
    let err = LlamaSlice::load(
        &model,
        LayerRange::new(20, 30),
        WeightMode::Gguf,
        &candle_core::Device::Cpu,
    )
    .unwrap_err();
    assert!(matches!(err, LoadError::TensorData { .. }), "{err}");
    assert!(err.to_string().contains("blk."), "{err}");
}

#[test]
fn not_a_gguf_at_all() {
    let mut file = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
    file.write_all(b"this is plainly not a model file").unwrap();
    let err = GgufModel::open(file.path()).unwrap_err();
    assert!(matches!(err, LoadError::InvalidGguf { .. }), "{err}");
}

/// A GGUF v3 header: the architecture, a string array, then `general.alignment` of the given
/// value type and little-endian bytes.
fn header_with_alignment(value_type: u32, value: &[u8]) -> tempfile::NamedTempFile {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.extend(3u64.to_le_bytes());
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    string(&mut out, "llama");
    string(&mut out, "tokenizer.ggml.tokens");
    out.extend(9u32.to_le_bytes());
    out.extend(8u32.to_le_bytes());
    out.extend(2u64.to_le_bytes());
    string(&mut out, "ab");
    string(&mut out, "c");
    string(&mut out, "general.alignment");
    out.extend(value_type.to_le_bytes());
    out.extend(value);
    let mut file = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
    file.write_all(&out).unwrap();
    file
}

#[test]
fn an_alignment_that_is_not_a_power_of_two_is_refused() {
    for (value_type, value) in [
        (4u32, 0u32.to_le_bytes().to_vec()),
        (2, 24u16.to_le_bytes().to_vec()),
        (0, vec![0]),
    ] {
        let err = GgufModel::open(header_with_alignment(value_type, &value).path()).unwrap_err();
        assert!(matches!(err, LoadError::InvalidGguf { .. }), "{err}");
        assert!(err.to_string().contains("must be a power of two"), "{err}");
    }
    // A power of two, or a negative one (ignored), passes on to the rest of the checks.
    for (value_type, value) in [
        (4u32, 64u32.to_le_bytes().to_vec()),
        (5, (-8i32).to_le_bytes().to_vec()),
    ] {
        let err = GgufModel::open(header_with_alignment(value_type, &value).path()).unwrap_err();
        assert!(matches!(err, LoadError::Metadata { .. }), "{err}");
    }
}

#[test]
fn a_context_whose_rope_tables_would_take_gigabytes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.gguf");
    // A file of a few hundred kilobytes whose RoPE tables would take 2 GiB.
    let spec = SyntheticLlama {
        heads: 1,
        kv_heads: 1,
        context_length: 1 << 22,
        ..SyntheticLlama::tiny()
    };
    spec.write_file(&path).unwrap();
    let err = GgufModel::open(&path).unwrap_err();
    assert!(matches!(err, LoadError::InconsistentSpec(_)), "{err}");
    assert!(err.to_string().contains("RoPE tables"), "{err}");
    // The same model with a context it can hold loads.
    SyntheticLlama {
        context_length: 1 << 14,
        ..spec
    }
    .write_file(&path)
    .unwrap();
    let model = GgufModel::open(&path).unwrap();
    LlamaSlice::load(
        &model,
        LayerRange::new(0, 1),
        WeightMode::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
}

#[test]
fn unknown_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mamba.gguf");
    let spec = SyntheticLlama {
        architecture: "mamba".into(),
        ..SyntheticLlama::tiny()
    };
    spec.write_file(&path).unwrap();
    let err = GgufModel::open(&path).unwrap_err();
    assert!(
        matches!(err, LoadError::UnsupportedArchitecture { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("mamba"), "{err}");
}

#[test]
fn layer_ranges_out_of_bounds_are_refused() {
    let (model, _) = smollm2();
    for (a, b) in [(0, 31), (30, 31), (5, 5), (40, 50)] {
        let err = LlamaSlice::load(
            &model,
            LayerRange::new(a, b),
            WeightMode::Gguf,
            &candle_core::Device::Cpu,
        )
        .unwrap_err();
        assert!(
            matches!(err, LoadError::LayerRange { .. }),
            "{a}..{b}: {err}"
        );
    }
    let err = LocalPipeline::load(
        &model,
        &[LayerRange::new(0, 10), LayerRange::new(11, 30)],
        WeightMode::Gguf,
        &candle_core::Device::Cpu,
    )
    .unwrap_err();
    assert!(err.to_string().contains("do not cover"), "{err}");
}

fn tiny_model(dir: &tempfile::TempDir) -> (GgufModel, ModelTokenizer) {
    let path = dir.path().join("tiny.gguf");
    SyntheticLlama::tiny().write_file(&path).unwrap();
    let model = GgufModel::open(&path).unwrap();
    let tokenizer = ModelTokenizer::from_gguf(model.metadata()).unwrap();
    (model, tokenizer)
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt,
        sampling: SamplingParams::default(),
        stop: StopConditions {
            max_tokens,
            stop: vec![],
            ignore_eos: true,
        },
    }
}

#[test]
fn empty_and_overlong_prompts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tokenizer) = tiny_model(&dir);
    let pipeline = LocalPipeline::load(
        &model,
        &[LayerRange::new(0, 6)],
        WeightMode::Q8_0,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(tokenizer.encode("").is_err());
    let err = generate(&pipeline, &tokenizer, &request(vec![], 4), |_| {}).unwrap_err();
    assert!(matches!(err, GenerateError::EmptyPrompt), "{err}");
    let context = model.spec().context_length;
    let long = tokenizer.encode(&"x".repeat(context + 10)).unwrap();
    let err = generate(&pipeline, &tokenizer, &request(long, 4), |_| {}).unwrap_err();
    assert!(matches!(err, GenerateError::PromptTooLong { .. }), "{err}");
    assert!(err.to_string().contains(&context.to_string()), "{err}");
    // A budget that would pass the context stops at the context, with finish reason length.
    let near = vec![65u32; context - 3];
    let summary = generate(&pipeline, &tokenizer, &request(near, 100), |_| {}).unwrap();
    assert_eq!(summary.generated_tokens, 3);
}

fn seg(cache: &mut SessionCache, rows: usize) -> Vec<SegmentInput<'_>> {
    vec![SegmentInput { cache, rows }]
}

#[test]
fn forward_refuses_bad_rows_and_leaves_caches_intact() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _) = tiny_model(&dir);
    let cpu = candle_core::Device::Cpu;
    let head = LlamaSlice::load(&model, LayerRange::new(0, 3), WeightMode::F32, &cpu).unwrap();
    let tail = LlamaSlice::load(&model, LayerRange::new(3, 6), WeightMode::F32, &cpu).unwrap();
    let mut cache = head.new_cache();
    let err = head
        .forward(SliceInput::Tokens(vec![1, 2, 3]), &mut seg(&mut cache, 2))
        .unwrap_err();
    assert!(matches!(err, ForwardError::RowMismatch { .. }), "{err}");
    let err = head
        .forward(SliceInput::Tokens(vec![1, 9999]), &mut seg(&mut cache, 2))
        .unwrap_err();
    assert!(
        matches!(err, ForwardError::TokenOutOfRange { token: 9999, .. }),
        "{err}"
    );
    let hidden = candle_core::Tensor::zeros((2, 64), candle_core::DType::F32, &cpu).unwrap();
    let err = head
        .forward(SliceInput::Hidden(hidden), &mut seg(&mut cache, 2))
        .unwrap_err();
    assert!(matches!(err, ForwardError::WrongInput { .. }), "{err}");
    let wrong = candle_core::Tensor::zeros((2, 63), candle_core::DType::F32, &cpu).unwrap();
    let mut tail_cache = tail.new_cache();
    let err = tail
        .forward(
            SliceInput::Hidden(wrong),
            &mut [SegmentInput {
                cache: &mut tail_cache,
                rows: 2,
            }],
        )
        .unwrap_err();
    assert!(matches!(err, ForwardError::HiddenShape { .. }), "{err}");
    let err = tail
        .forward(
            SliceInput::Hidden(
                candle_core::Tensor::zeros((1, 64), candle_core::DType::F32, &cpu).unwrap(),
            ),
            &mut [SegmentInput {
                cache: &mut cache,
                rows: 1,
            }],
        )
        .unwrap_err();
    assert!(matches!(err, ForwardError::CacheMismatch { .. }), "{err}");
    assert!(
        cache.is_empty() && tail_cache.is_empty(),
        "refused calls leave caches untouched"
    );
    let context = model.spec().context_length;
    let err = head
        .forward(
            SliceInput::Tokens(vec![5; context + 1]),
            &mut [SegmentInput {
                cache: &mut cache,
                rows: context + 1,
            }],
        )
        .unwrap_err();
    assert!(matches!(err, ForwardError::ContextOverflow { .. }), "{err}");
}

mod arbitrary_bytes {
    use proptest::prelude::*;
    use std::io::Write;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

        /// The GGUF reader never panics on arbitrary bytes, with or without a valid magic.
        #[test]
        fn gguf_reader_never_panics(prefix in any::<bool>(), bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut file = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
            if prefix {
                file.write_all(b"GGUF\x03\x00\x00\x00").unwrap();
            }
            file.write_all(&bytes).unwrap();
            let _ = sovra_model::GgufModel::open(file.path());
        }

        /// Corrupting any byte of a small valid model's header gives an error or a model, never
        /// a panic, also when loading its slices.
        #[test]
        fn corrupted_headers_never_panic(index in 0usize..4096, value in any::<u8>()) {
            let mut data = Vec::new();
            sovra_model::synthetic::SyntheticLlama { layers: 2, hidden_size: 32, heads: 2, kv_heads: 1, ffn_size: 64, vocab_size: 300, context_length: 64, ..sovra_model::synthetic::SyntheticLlama::tiny() }
                .write(&mut std::io::Cursor::new(&mut data))
                .unwrap();
            let i = index % data.len().min(4096);
            data[i] = value;
            let mut file = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
            file.write_all(&data).unwrap();
            if let Ok(model) = sovra_model::GgufModel::open(file.path()) {
                let layers = model.spec().layers;
                let _ = sovra_model::LlamaSlice::load(&model, sovra_model::LayerRange::new(0, layers), sovra_model::WeightMode::F32, &candle_core::Device::Cpu);
                let _ = sovra_model::ModelTokenizer::from_gguf(model.metadata());
            }
        }
    }
}
