//! What a worker computes on and how fast: device facts from the OS, and a speed measured by
//! running a real transformer block forward (f32, on the worker's own threads).

use std::time::{Duration, Instant};

use sovra_model::synthetic::SyntheticLlama;
use sovra_model::{GgufModel, LayerRange, LlamaSlice, SegmentInput, SliceInput, WeightMode};

/// The device a worker computes on.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceInfo {
    /// "cpu" (or "cuda").
    pub kind: String,
    /// Processor model.
    pub name: String,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// The CPU's model name and the machine's memory, from /proc.
pub fn cpu_device() -> DeviceInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let name = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "cpu".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_bytes = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    DeviceInfo {
        kind: "cpu".into(),
        name,
        memory_bytes,
    }
}

/// Measures GFLOP/s of a real Llama block forward (hidden 1024, FFN 2816, 256 rows, f32) plus
/// its LM head, best of `repeat` runs after one warm-up. `scratch` is a folder for the block's
/// weights file.
pub fn measure_speed_gflops(scratch: &std::path::Path, repeat: usize) -> Result<f64, String> {
    let spec = SyntheticLlama {
        layers: 1,
        hidden_size: 1024,
        heads: 16,
        kv_heads: 4,
        ffn_size: 2816,
        vocab_size: 512,
        context_length: 512,
        dtype: candle_core::quantized::GgmlDType::F32,
        ..SyntheticLlama::tiny()
    };
    let path = scratch.join(format!("speedtest-{}.gguf", std::process::id()));
    spec.write_file(&path)
        .map_err(|e| format!("writing the speed test block: {e}"))?;
    let result = (|| {
        let model = GgufModel::open(&path).map_err(|e| e.to_string())?;
        let slice = LlamaSlice::load(
            &model,
            LayerRange::new(0, 1),
            WeightMode::F32,
            &candle_core::Device::Cpu,
        )
        .map_err(|e| e.to_string())?;
        let rows = 256;
        let flops =
            2.0 * (model.spec().layer_params + model.spec().embedding_params) as f64 * rows as f64;
        let mut best = Duration::MAX;
        for _ in 0..repeat.max(1) + 1 {
            let mut cache = slice.new_cache();
            let ids: Vec<u32> = (0..rows as u32).map(|i| 32 + (i * 7) % 448).collect();
            let start = Instant::now();
            slice
                .forward(
                    SliceInput::Tokens(ids),
                    &mut [SegmentInput {
                        cache: &mut cache,
                        rows,
                    }],
                )
                .map_err(|e| e.to_string())?;
            best = best.min(start.elapsed());
        }
        Ok(flops / best.as_secs_f64() / 1e9)
    })();
    let _ = std::fs::remove_file(&path);
    result
}
