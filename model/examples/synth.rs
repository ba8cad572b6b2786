//! Writes a Llama-shaped GGUF with random weights and a byte-level tokenizer
//! (`sovra_model::synthetic`), by default in the shape of SmolLM2-135M (30 layers, 576 wide,
//! 9 heads of which 3 KV, MLP 1536, vocabulary 49152, Q4_1 blocks, Q8_0 embedding tied to the
//! head): a model of the real one's cost per token for speed measurements on a machine the
//! real one cannot be fetched to.
//!
//! ```text
//! cargo run --release -p sovra-model --example synth -- OUT.gguf [layers=N] [hidden=N]
//!     [heads=N] [kv_heads=N] [ffn=N] [vocab=N] [context=N] [dtype=q4_1|q8_0|f16|f32] [seed=N]
//! ```

use std::process::ExitCode;

use candle_core::quantized::GgmlDType;
use sovra_model::synthetic::SyntheticLlama;

fn shape(args: &[String]) -> Result<SyntheticLlama, String> {
    let mut model = SyntheticLlama {
        architecture: "llama".into(),
        layers: 30,
        hidden_size: 576,
        heads: 9,
        kv_heads: 3,
        ffn_size: 1536,
        vocab_size: 49152,
        context_length: 8192,
        dtype: GgmlDType::Q4_1,
        separate_head: false,
        seed: 1,
    };
    for arg in args {
        let (key, value) = arg
            .split_once('=')
            .ok_or_else(|| format!("`{arg}` is not KEY=VALUE"))?;
        let number = || {
            value
                .parse::<usize>()
                .map_err(|_| format!("{key}: `{value}` is not a whole number"))
        };
        match key {
            "layers" => model.layers = number()?,
            "hidden" => model.hidden_size = number()?,
            "heads" => model.heads = number()?,
            "kv_heads" => model.kv_heads = number()?,
            "ffn" => model.ffn_size = number()?,
            "vocab" => model.vocab_size = number()?,
            "context" => model.context_length = number()?,
            "seed" => model.seed = number()? as u64,
            "dtype" => {
                model.dtype = match value {
                    "q4_1" => GgmlDType::Q4_1,
                    "q8_0" => GgmlDType::Q8_0,
                    "f16" => GgmlDType::F16,
                    "f32" => GgmlDType::F32,
                    _ => return Err(format!("dtype: `{value}` is not q4_1, q8_0, f16 or f32")),
                }
            }
            _ => return Err(format!("unknown key `{key}`")),
        }
    }
    if model.layers == 0 || model.heads == 0 || model.kv_heads == 0 {
        return Err("layers, heads and kv_heads must be at least 1".into());
    }
    if !model.hidden_size.is_multiple_of(model.heads) || !model.heads.is_multiple_of(model.kv_heads)
    {
        return Err("hidden must be a multiple of heads, and heads of kv_heads".into());
    }
    if model.vocab_size < 258 {
        return Err("vocab must be at least 258 (256 bytes and two chat tokens)".into());
    }
    Ok(model)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((out, rest)) = args.split_first() else {
        eprintln!("usage: synth OUT.gguf [KEY=VALUE]... (see the source's header)");
        return ExitCode::from(2);
    };
    let model = match shape(rest) {
        Ok(model) => model,
        Err(e) => {
            eprintln!("synth: {e}");
            return ExitCode::from(2);
        }
    };
    match model.write_file(std::path::Path::new(out)) {
        Ok(()) => {
            println!("{out}: {model:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("synth: writing {out}: {e}");
            ExitCode::FAILURE
        }
    }
}
