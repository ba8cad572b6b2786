//! Shared helpers of sovra's integration tests: where the real model and the reference outputs
//! are, loading them, and [`federation::TestFederation`], a real coordinator with real workers.

pub mod federation;
pub mod relay;

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;
use sovra_model::fetch::{fetch, known_model, sovra_home};
use sovra_model::{GgufModel, LayerRange, ModelTokenizer, WeightMode};
use sovra_worker::LocalPipeline;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The reference outputs: `$SOVRA_GOLDEN`, or `shared/golden` beside the checkout.
pub fn golden_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SOVRA_GOLDEN") {
        return PathBuf::from(dir);
    }
    let inside = workspace_root().join("shared").join("golden");
    if inside.is_dir() {
        return inside;
    }
    workspace_root().join("..").join("shared").join("golden")
}

/// The fields of `/proc/<pid>/stat` after the command name: state first, then ppid, and so on
/// (utime and stime at 11 and 12); `pid` may be `self`. None once the process is gone.
#[cfg(target_os = "linux")]
pub fn proc_stat(pid: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself hold spaces or parentheses.
    let after = stat.get(stat.rfind(')')? + 2..)?;
    Some(after.split(' ').map(String::from).collect())
}

/// Starts `command` with its stdout piped and its stderr discarded, and waits for the first line
/// it prints (the rest of its stdout is closed).
pub fn spawn_until_first_line(
    command: &mut std::process::Command,
) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawning the command");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("reading its first line");
    (child, line)
}

/// The SmolLM2 GGUF, fetched into the cache if it is not there yet.
pub fn smollm2_path() -> PathBuf {
    let model = known_model("smollm2").expect("smollm2 is a known model");
    fetch(&sovra_home(), model, &mut |line| eprintln!("{line}")).expect("fetching smollm2")
}

/// The opened SmolLM2 model and its tokenizer.
pub fn smollm2() -> (GgufModel, ModelTokenizer) {
    let model = GgufModel::open(smollm2_path()).expect("opening smollm2");
    let tokenizer = ModelTokenizer::from_gguf(model.metadata()).expect("smollm2 tokenizer");
    (model, tokenizer)
}

/// A pipeline over `ranges` of `model` in `mode`.
pub fn pipeline(model: &GgufModel, ranges: &[LayerRange], mode: WeightMode) -> LocalPipeline {
    LocalPipeline::load(model, ranges, mode, &candle_core::Device::Cpu).expect("loading pipeline")
}

/// One case of `smollm2_hf_greedy.json`.
#[derive(Debug, Deserialize)]
pub struct GoldenCase {
    /// The user's question.
    pub question: String,
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// The 32 greedy tokens.
    pub generated_ids: Vec<u32>,
    /// Top-5 ids and logits of the first 8 generated positions.
    pub top5_first8: Vec<GoldenTop5>,
}

/// Top-5 of one generated position.
#[derive(Debug, Deserialize)]
pub struct GoldenTop5 {
    /// Index among the generated tokens.
    pub gen_pos: usize,
    /// Ids, most likely first.
    pub top5_ids: Vec<u32>,
    /// Their logits.
    pub top5_logits: Vec<f32>,
}

#[derive(Debug, Deserialize)]
struct GoldenFile {
    cases: Vec<GoldenCase>,
}

/// The reference greedy cases.
pub fn golden_cases() -> Result<Vec<GoldenCase>> {
    let path = golden_dir().join("smollm2_hf_greedy.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (set SOVRA_GOLDEN)", path.display()))?;
    Ok(serde_json::from_str::<GoldenFile>(&text)?.cases)
}

/// The reference logits at the last prompt position of case 1.
pub fn golden_last_logits() -> Result<Vec<f32>> {
    let path = golden_dir().join("smollm2_prompt1_lastpos_logits.f32le");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Greedy decode of `steps` tokens after `prompt`, returning the tokens and every step's logits.
pub fn greedy(pipeline: &LocalPipeline, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut session = pipeline.new_session();
    let mut logits = pipeline
        .forward(&mut [&mut session], &[prompt])
        .expect("prefill")
        .remove(0);
    let mut tokens = Vec::with_capacity(steps);
    let mut all = Vec::with_capacity(steps);
    for _ in 0..steps {
        let token = sovra_model::llama::argmax(&logits);
        tokens.push(token);
        all.push(std::mem::take(&mut logits));
        if tokens.len() < steps {
            logits = pipeline
                .forward(&mut [&mut session], &[&[token]])
                .expect("decode")
                .remove(0);
        }
    }
    (tokens, all)
}

/// The ids of the `k` largest values, largest first.
pub fn top_k(values: &[f32], k: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..values.len() as u32).collect();
    ids.sort_by(|&a, &b| {
        values[b as usize]
            .total_cmp(&values[a as usize])
            .then(a.cmp(&b))
    });
    ids.truncate(k);
    ids
}

/// Largest |a - b| / max(|b|, 1) over two equal-length slices.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}
