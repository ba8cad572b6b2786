//! `sovra demo --bench`: the demo federation measured against `generate --local`, in one run
//! (the runs compared alternate, round by round):
//! decode speed of one job on 3 stages vs `generate --local`, the cost of a hop, and the
//! aggregate throughput of concurrent jobs.

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, anyhow};
use sovra_proto::channel::AuthChannel;
use sovra_proto::pb;

use crate::demo::{DemoArgs, WorkerCores};
use crate::fed::status;

const PROMPT: &str = "Write a long story about a lighthouse keeper.";

fn request(tokens: u32) -> pb::RunJobRequest {
    pb::RunJobRequest {
        model: "demo-model".into(),
        prompt: PROMPT.into(),
        chat: true,
        system: String::new(),
        sampling: Some(pb::Sampling {
            max_tokens: tokens,
            ignore_eos: true,
            ..Default::default()
        }),
        policy: None,
    }
}

/// Runs one job to its end; returns (generated tokens, decode tok/s).
async fn job(channel: AuthChannel, tokens: u32) -> Result<(u32, f64)> {
    let mut stream = pb::jobs_client::JobsClient::new(channel)
        .run_job(request(tokens))
        .await
        .map_err(status)?
        .into_inner();
    while let Some(event) = stream.message().await.map_err(status)? {
        if let Some(pb::job_event::Kind::Summary(s)) = event.kind {
            return Ok((s.generated_tokens, s.decode_tok_s));
        }
    }
    Err(anyhow!("job ended without a summary"))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn concurrent(channel: &AuthChannel, jobs: usize, tokens: u32) -> Result<f64> {
    let start = Instant::now();
    let handles: Vec<_> = (0..jobs)
        .map(|_| tokio::spawn(job(channel.clone(), tokens)))
        .collect();
    let mut total = 0u32;
    for h in handles {
        total += h.await??.0;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

struct Load {
    jobs: usize,
    finished: usize,
    failed: usize,
    p50_ms: f64,
    p99_ms: f64,
    tok_s: f64,
}

/// Submits `jobs` jobs at once and measures each one's latency from submission to summary.
async fn load(channel: &AuthChannel, jobs: usize, tokens: u32) -> Result<Load> {
    let start = Instant::now();
    let handles: Vec<_> = (0..jobs)
        .map(|_| {
            let channel = channel.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                job(channel, tokens)
                    .await
                    .map(|(n, _)| (n, t.elapsed().as_secs_f64() * 1e3))
            })
        })
        .collect();
    let (mut latencies, mut total, mut failed) = (Vec::new(), 0u32, 0);
    for h in handles {
        match h.await? {
            Ok((n, ms)) => {
                total += n;
                latencies.push(ms);
            }
            Err(_) => failed += 1,
        }
    }
    let wall = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Load {
        jobs,
        finished: latencies.len(),
        failed,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        tok_s: total as f64 / wall,
    })
}

/// Decode speed of one `sovra generate --local` run as its own process (the command a user
/// would compare against), while the federation idles.
fn local_decode(exe: &Path, model_path: &Path, args: &DemoArgs, tokens: u32) -> Result<f64> {
    let out = std::process::Command::new(exe)
        .args([
            "generate",
            "--local",
            "--chat",
            "--ignore-eos",
            "--json",
            "--model",
        ])
        .arg(model_path)
        .args(["--dtype", &args.dtype.to_string()])
        .args(["--max-tokens", &tokens.to_string(), PROMPT])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(anyhow!("generate --local failed ({})", out.status));
    }
    let summary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["type"] == "summary")
        .ok_or_else(|| anyhow!("generate --local printed no summary"))?;
    summary["decode_tok_s"]
        .as_f64()
        .ok_or_else(|| anyhow!("summary without decode_tok_s"))
}

async fn set_stages(operator: &AuthChannel, stages: u32) -> Result<()> {
    let args_stub = stages;
    let mut placements = pb::placements_client::PlacementsClient::new(operator.clone());
    let placed = placements
        .set_placement(pb::SetPlacementRequest {
            model: "demo-model".into(),
            how: Some(pb::set_placement_request::How::Stages(args_stub)),
        })
        .await
        .map_err(status)?
        .into_inner();
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let p = placements
            .show_placement(pb::ShowPlacementRequest {
                model: "demo-model".into(),
            })
            .await
            .map_err(status)?
            .into_inner();
        let ready = p.version == placed.version
            && p.chains
                .iter()
                .flat_map(|c| &c.stages)
                .all(|s| s.state == pb::AssignmentState::Ready as i32);
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "placement with {stages} stages did not become ready"
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Rounds of the single-job comparison (generate --local, 1 stage, 3 stages, one after the
/// other in each round).
const SOLO_ROUNDS: usize = 5;
/// Rounds of the concurrency comparison (1, 4 and 16 jobs in each round).
const CONCURRENT_ROUNDS: usize = 3;

fn ratios(runs: &[f64], base: &[f64]) -> Vec<f64> {
    runs.iter().zip(base).map(|(r, b)| r / b).collect()
}

/// A table row: the median of `runs`, the median of the rounds' ratios against `base`, and
/// each round's ratio.
fn row(label: &str, runs: &[f64], base: &[f64]) -> String {
    let r = ratios(runs, base);
    let each: Vec<String> = r.iter().map(|x| format!("{x:.2}")).collect();
    format!(
        "| {label} | {:.1} | {:.2}x | {} |",
        median(runs),
        median(&r),
        each.join(" ")
    )
}

/// Runs the benchmark and prints a markdown report. The runs being compared alternate within
/// each round and every ratio is the median of the rounds' own ratios, so a stretch where the
/// host is slower weighs on both sides of a ratio.
pub async fn run(
    args: &DemoArgs,
    (worker_threads, layout): &(usize, WorkerCores),
    exe: &Path,
    model_path: &Path,
    operator: &AuthChannel,
    tenant: &AuthChannel,
) -> Result<()> {
    let tokens = 64u32;
    let threads = candle_core::utils::get_num_threads();
    let (mut local, mut one, mut three) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..SOLO_ROUNDS {
        local.push(local_decode(exe, model_path, args, tokens)?);
        set_stages(operator, 1).await?;
        job(tenant.clone(), 8).await?;
        one.push(job(tenant.clone(), tokens).await?.1);
        set_stages(operator, 3).await?;
        job(tenant.clone(), 8).await?;
        three.push(job(tenant.clone(), tokens).await?.1);
    }
    let mut aggregate: Vec<(usize, Vec<f64>)> = [1usize, 4, 16].map(|n| (n, Vec::new())).into();
    for _ in 0..CONCURRENT_ROUNDS {
        for (n, runs) in aggregate.iter_mut() {
            runs.push(concurrent(tenant, *n, 32).await?);
        }
    }
    let load = load(tenant, 100, 32).await?;
    let hop_us: Vec<f64> = one
        .iter()
        .zip(&three)
        .map(|(o, t)| (1.0 / t - 1.0 / o) / 3.0 * 1e6)
        .collect();
    println!(
        "### {} weights, {tokens} greedy tokens; generate --local with {threads} threads, each of the 3 workers with {worker_threads}, {}; all processes on this machine\n",
        args.dtype,
        layout.describe()
    );
    println!(
        "{SOLO_ROUNDS} rounds of: generate --local, a job on 1 stage, a job on 3 stages; medians\n"
    );
    println!("| run | decode tok/s | vs generate --local | ratio in each round |");
    println!("|---|---|---|---|");
    println!(
        "| generate --local (one process) | {:.1} | 1.00x | |",
        median(&local)
    );
    println!("{}", row("job on 1 stage", &one, &local));
    println!("{}", row("job on 3 stages (FR → DE → NL)", &three, &local));
    println!(
        "\nPer-hop overhead (3 hops per token on 3 stages, vs 1 stage in the same round): {:.0} µs per token per hop\n",
        median(&hop_us)
    );
    println!(
        "{CONCURRENT_ROUNDS} rounds of 1, 4 and 16 concurrent jobs (32 tokens each, 3 stages); medians\n"
    );
    println!("| concurrent jobs | aggregate tok/s | vs 1 job | ratio in each round |");
    println!("|---|---|---|---|");
    for (n, runs) in &aggregate {
        println!("{}", row(&n.to_string(), runs, &aggregate[0].1));
    }
    println!(
        "\nLoad: {} concurrent jobs of 32 tokens on 3 stages: {} finished, {} failed; job latency p50 {:.0} ms, p99 {:.0} ms; aggregate {:.1} tok/s",
        load.jobs, load.finished, load.failed, load.p50_ms, load.p99_ms, load.tok_s
    );
    Ok(())
}
