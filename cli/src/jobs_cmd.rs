//! `sovra run` (a federated job, streamed) and `sovra job …` (list, get, cancel, audit).

use std::io::Write;

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use sovra_proto::channel::AuthChannel;
use sovra_proto::pb;

use crate::fed::{ConnectArgs, PolicyArgs, status, table};
use crate::generate::SamplingArgs;

/// Arguments of `sovra run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Model name as registered with the federation.
    #[arg(short, long, env = "SOVRA_MODEL")]
    pub model: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System turn for the chat template (implies --chat).
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// The prompt.
    pub prompt: String,
}

impl RunArgs {
    /// The gRPC request, its sampling settings checked (on the wire an unset top-k or top-p
    /// is 0, so `--top-p 0` would otherwise pass for unset).
    pub fn request(&self) -> Result<pb::RunJobRequest> {
        let s = &self.sampling;
        let checked = s.sampling()?;
        Ok(pb::RunJobRequest {
            model: self.model.clone(),
            prompt: self.prompt.clone(),
            chat: self.chat || self.system.is_some(),
            system: self.system.clone().unwrap_or_default(),
            sampling: Some(pb::Sampling {
                temperature: s.temperature,
                top_k: checked.top_k.unwrap_or(0).min(u32::MAX as usize) as u32,
                top_p: checked.top_p.unwrap_or(0.0),
                seed: s.seed,
                max_tokens: s.max_tokens()? as u32,
                stop: s.stop.clone(),
                ignore_eos: s.ignore_eos,
            }),
            policy: Some(self.policy.to_pb()),
        })
    }
}

/// Runs `sovra run`: JSON errors with `--json`, a one-line error otherwise.
pub async fn run(args: RunArgs, conn: &ConnectArgs) -> Result<()> {
    let result = async {
        let request = args.request()?;
        stream_job(conn.channel().await?, request, conn.json).await
    }
    .await;
    match result {
        Err(err) if conn.json => {
            crate::generate::print_error_line(&err);
            Err(anyhow!("{err:#}"))
        }
        other => other,
    }
}

/// A job that started and then failed or was cancelled: the error names it (and `--json`
/// carries its id).
#[derive(Debug)]
pub struct JobFailed {
    /// The job.
    pub job_id: String,
    /// Why it ended.
    pub message: String,
    /// Cancelled rather than failed.
    pub cancelled: bool,
}

impl std::fmt::Display for JobFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.cancelled, self.message.strip_prefix("cancelled ")) {
            // "cancelled by tenant acme": the reason says it already.
            (true, Some(by)) => write!(f, "{} was cancelled {by}", self.job_id),
            (true, None) => write!(f, "{} was cancelled: {}", self.job_id, self.message),
            (false, _) => write!(f, "{} failed: {}", self.job_id, self.message),
        }
    }
}

impl std::error::Error for JobFailed {}

/// Runs a job on `channel` and streams it to stdout (text, or JSON lines), stats on stderr.
pub async fn stream_job(
    channel: AuthChannel,
    request: pb::RunJobRequest,
    json_mode: bool,
) -> Result<()> {
    if request.prompt.trim().is_empty() {
        return Err(anyhow!("the prompt is empty"));
    }
    let mut events = pb::jobs_client::JobsClient::new(channel)
        .run_job(request)
        .await
        .map_err(status)?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    let mut job_id = String::new();
    loop {
        let event = match events.message().await {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(s)
                if s.code() == tonic::Code::Unknown
                    || s.code() == tonic::Code::Unavailable
                    || s.code() == tonic::Code::Internal =>
            {
                let lost = format!(
                    "the connection to the coordinator was lost before the job finished: {}",
                    s.message()
                );
                if job_id.is_empty() {
                    return Err(anyhow!(lost));
                }
                // `--json` carries the id: the job's record says how it ended.
                return Err(JobFailed {
                    job_id,
                    cancelled: false,
                    message: lost,
                }
                .into());
            }
            Err(s) if job_id.is_empty() => return Err(status(s)),
            Err(s) => {
                return Err(JobFailed {
                    job_id,
                    cancelled: s.code() == tonic::Code::Cancelled,
                    message: status(s).to_string(),
                }
                .into());
            }
        };
        match event.kind {
            // On stderr in either mode: `--json` keeps stdout to the lines of `generate`.
            Some(pb::job_event::Kind::Started(s)) => {
                let moved = !job_id.is_empty();
                job_id = s.job_id.clone();
                let stages: Vec<String> = s
                    .stages
                    .iter()
                    .map(|st| {
                        format!(
                            "{}({}) {}..{}",
                            st.worker_id, st.country, st.start_layer, st.end_layer
                        )
                    })
                    .collect();
                if moved {
                    let from = s.stages.first().map_or(0, |st| st.from_token);
                    eprintln!(
                        "\n[{} moved to {} after {from} tokens]",
                        s.job_id,
                        stages.join(" → ")
                    );
                } else {
                    eprintln!("[{} on {}]", s.job_id, stages.join(" → "));
                }
            }
            Some(pb::job_event::Kind::Token(t)) => {
                if json_mode {
                    writeln!(
                        stdout,
                        "{}",
                        json!({"type": "token", "index": t.index, "token_id": t.token_id, "text": t.text})
                    )?;
                } else {
                    write!(stdout, "{}", t.text)?;
                }
                stdout.flush()?;
            }
            Some(pb::job_event::Kind::Summary(s)) => {
                if json_mode {
                    writeln!(
                        stdout,
                        "{}",
                        json!({"type": "summary", "prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens, "finish_reason": s.finish_reason, "ttft_ms": s.ttft_ms, "prompt_tok_s": s.prompt_tok_s, "decode_tok_s": s.decode_tok_s, "job_id": s.job_id})
                    )?;
                } else {
                    writeln!(stdout)?;
                    eprintln!(
                        "[{}: prompt {} tokens at {:.1} tok/s | {} generated at {:.1} tok/s | first token {:.0} ms | finish: {}]",
                        s.job_id,
                        s.prompt_tokens,
                        s.prompt_tok_s,
                        s.generated_tokens,
                        s.decode_tok_s,
                        s.ttft_ms,
                        s.finish_reason
                    );
                }
                return Ok(());
            }
            None => {}
        }
    }
    Err(anyhow!(
        "the coordinator ended the job stream without a summary"
    ))
}

/// `sovra job …`.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// List jobs, newest first (a tenant sees its own; the operator all).
    List {
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Only jobs older than this one (the last of the previous page).
        #[arg(long)]
        before: Option<String>,
    },
    /// Show one job.
    Get {
        /// Job id.
        id: String,
    },
    /// Cancel a running job.
    Cancel {
        /// Job id.
        id: String,
    },
    /// Show where each layer of a job ran.
    Audit {
        /// Job id.
        id: String,
    },
}

fn audit_json(a: &pb::AuditStage) -> Value {
    let known = a.attempt > 0;
    json!({"attempt": known.then_some(a.attempt), "from_token": known.then_some(a.from_token), "worker": a.worker_id, "provider": a.provider, "country": a.country, "layers": format!("{}..{}", a.start_layer, a.end_layer)})
}

fn job_json(j: &pb::Job) -> Value {
    let mut doc = job_line_json(j);
    doc["token_ids"] = json!(j.token_ids);
    doc["text"] = json!(j.text);
    doc
}

/// A job as the list shows it: everything but its tokens and text.
fn job_line_json(j: &pb::Job) -> Value {
    json!({"job_id": j.job_id, "tenant": j.tenant, "model": j.model, "state": j.state, "prompt_tokens": j.prompt_tokens, "generated_tokens": j.generated_tokens, "finish_reason": j.finish_reason, "error": j.error, "audit": j.audit.iter().map(audit_json).collect::<Vec<_>>(), "created_unix": j.created_unix, "finished_unix": j.finished_unix})
}

/// Runs `sovra job …`.
pub async fn job(cmd: JobCommand, conn: &ConnectArgs) -> Result<()> {
    // A job of the longest budget (2^20 tokens) carries its ids and text: more than tonic's
    // default 4 MiB.
    let mut client =
        pb::jobs_client::JobsClient::new(conn.channel().await?).max_decoding_message_size(64 << 20);
    let one = |j: &pb::Job, audit_only: bool| {
        if conn.json {
            let doc = if audit_only {
                json!({"job_id": j.job_id, "audit": j.audit.iter().map(audit_json).collect::<Vec<_>>()})
            } else {
                job_json(j)
            };
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            return;
        }
        if !audit_only {
            println!(
                "{} · {} · {} · {} · {} prompt + {} generated tokens{}",
                j.job_id,
                j.tenant,
                j.model,
                j.state,
                j.prompt_tokens,
                j.generated_tokens,
                if j.error.is_empty() {
                    String::new()
                } else {
                    format!(" · {}", j.error)
                }
            );
            if !j.text.is_empty() {
                println!("{}\n", j.text.trim_end());
            }
        }
        let rows: Vec<Vec<String>> = j
            .audit
            .iter()
            .map(|a| {
                let known = |v: u64| {
                    if a.attempt > 0 {
                        v.to_string()
                    } else {
                        "-".into()
                    }
                };
                vec![
                    known(a.attempt.into()),
                    known(a.from_token),
                    a.worker_id.clone(),
                    a.provider.clone(),
                    a.country.clone(),
                    format!("{}..{}", a.start_layer, a.end_layer),
                ]
            })
            .collect();
        table(
            &[
                "attempt",
                "from token",
                "worker",
                "provider",
                "country",
                "layers",
            ],
            &rows,
        );
    };
    match cmd {
        JobCommand::List { limit, before } => {
            let page = client
                .list_jobs(pb::ListJobsRequest {
                    limit,
                    before: before.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let jobs = page.jobs;
            if page.more
                && let Some(last) = jobs.last()
            {
                eprintln!(
                    "older jobs follow: sovra job list --limit {limit} --before {}",
                    last.job_id
                );
            }
            if conn.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&Value::Array(
                        jobs.iter().map(job_line_json).collect()
                    ))?
                );
            } else {
                let rows: Vec<Vec<String>> = jobs
                    .iter()
                    .map(|j| {
                        vec![
                            j.job_id.clone(),
                            j.tenant.clone(),
                            j.model.clone(),
                            j.state.clone(),
                            j.generated_tokens.to_string(),
                            j.finish_reason.clone(),
                        ]
                    })
                    .collect();
                table(
                    &["job", "tenant", "model", "state", "tokens", "finish"],
                    &rows,
                );
            }
        }
        JobCommand::Get { id } => one(
            &client
                .get_job(pb::JobRef { job_id: id })
                .await
                .map_err(status)?
                .into_inner(),
            false,
        ),
        JobCommand::Cancel { id } => one(
            &client
                .cancel_job(pb::JobRef { job_id: id })
                .await
                .map_err(status)?
                .into_inner(),
            false,
        ),
        JobCommand::Audit { id } => one(
            &client
                .get_job(pb::JobRef { job_id: id })
                .await
                .map_err(status)?
                .into_inner(),
            true,
        ),
    }
    Ok(())
}
