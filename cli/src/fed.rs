//! Client commands of the federation: providers, tenants, workers, models and placements, over
//! TLS to the coordinator. Tables for people, one JSON document with `--json` (a job's tokens:
//! JSON lines).

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use sovra_coordinator::service::spec_pb;
use sovra_model::fetch::{resolve_model, sha256_file, sovra_home};
use sovra_model::{GgufModel, LayerRange, WeightMode};
use sovra_proto::channel::{AuthChannel, connect};
use sovra_proto::pb;

use crate::units::{human_bytes, parse_path};

/// How to reach the coordinator.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Coordinator URL, https://host:port.
    #[arg(long, global = true, env = "SOVRA_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Federation CA certificate (ca.pem from the coordinator's data dir).
    #[arg(long, global = true, env = "SOVRA_CA", value_parser = parse_path)]
    pub ca: Option<PathBuf>,
    /// API token (operator or tenant). Given on the command line, it or --token-file wins over
    /// SOVRA_TOKEN and SOVRA_TOKEN_FILE.
    #[arg(long, global = true, env = "SOVRA_TOKEN", hide_env_values = true, value_parser = parse_token)]
    pub token: Option<String>,
    /// File holding the API token (e.g. the coordinator's admin.token).
    #[arg(long, global = true, env = "SOVRA_TOKEN_FILE", value_parser = parse_path)]
    pub token_file: Option<PathBuf>,
    /// Print JSON: one document instead of a table; a job's tokens as JSON lines.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ConnectArgs {
    /// Opens an authenticated channel.
    pub async fn channel(&self) -> Result<AuthChannel> {
        let url = self.coordinator.as_deref().ok_or_else(|| {
            anyhow!("no coordinator: pass --coordinator https://HOST:PORT or set SOVRA_COORDINATOR")
        })?;
        let ca_path = self
            .ca
            .as_ref()
            .ok_or_else(|| anyhow!("no CA certificate: pass --ca FILE or set SOVRA_CA"))?;
        let ca = std::fs::read_to_string(ca_path)
            .with_context(|| format!("reading {}", ca_path.display()))?;
        // A token or token file from the command line wins over one from the environment.
        let (from_env, file_from_env) = ENV_SOURCED.get().copied().unwrap_or_default();
        let file_on_command_line = self.token_file.is_some() && !file_from_env;
        let token = self
            .token
            .as_ref()
            .filter(|_| !(from_env && file_on_command_line));
        let token = match (token, &self.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if !ca.contains("-----BEGIN CERTIFICATE-----") {
            bail!(
                "{} holds no PEM certificate: --ca takes the coordinator's ca.pem",
                ca_path.display()
            );
        }
        connect(url, &ca, None, token.as_deref())
            .await
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("UnknownIssuer") {
                    anyhow!(
                        "{text}: the coordinator's certificate is not signed by the CA in {} (is it this federation's ca.pem?)",
                        ca_path.display()
                    )
                } else {
                    e.into()
                }
            })
    }
}

/// Whether the token and the token file (in that order) came from the environment rather than
/// the command line; set once from the parsed command line.
static ENV_SOURCED: std::sync::OnceLock<(bool, bool)> = std::sync::OnceLock::new();

/// Records where `--token` and `--token-file` came from (global options: the innermost
/// subcommand's matches hold them).
pub fn note_env_sources(matches: &clap::ArgMatches) {
    let mut innermost = matches;
    while let Some((_, sub)) = innermost.subcommand() {
        innermost = sub;
    }
    let from_env = |id: &str| {
        innermost.try_get_raw(id).is_ok_and(|v| v.is_some())
            && innermost.value_source(id) == Some(clap::parser::ValueSource::EnvVariable)
    };
    let _ = ENV_SOURCED.set((from_env("token"), from_env("token_file")));
}

/// A non-empty API token.
fn parse_token(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err(
            "the token is empty (if it comes from an environment variable, unset it or give a token)"
                .into(),
        );
    }
    Ok(text.to_string())
}

/// Turns a gRPC status into a one-line error.
pub fn status(s: tonic::Status) -> anyhow::Error {
    anyhow!(
        "{}",
        if s.message().is_empty() {
            s.code().description().to_string()
        } else {
            s.message().to_string()
        }
    )
}

/// Prints `rows` under `headers` as an aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn emit(json_mode: bool, doc: Value, human: impl FnOnce()) {
    if json_mode {
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        human();
    }
}

/// `sovra provider …`.
#[derive(Debug, Subcommand)]
pub enum ProviderCommand {
    /// Admit a provider.
    Add {
        /// Provider name (lowercase letters, digits, '-').
        name: String,
        /// ISO country code (FR, DE, …).
        #[arg(long)]
        country: String,
        /// Certifications held, comma-separated.
        #[arg(long = "cert", value_delimiter = ',')]
        certifications: Vec<String>,
    },
    /// List providers.
    List,
    /// Print a one-time join token for one worker of the provider.
    JoinToken {
        /// Provider name.
        name: String,
        /// Validity (e.g. 10m, 1h).
        #[arg(long, default_value = "1h", value_parser = crate::units::parse_ttl)]
        ttl: std::time::Duration,
    },
    /// Revoke a provider: its workers are refused from now on.
    Revoke {
        /// Provider name.
        name: String,
    },
}

fn provider_json(p: &pb::Provider) -> Value {
    json!({"name": p.name, "country": p.country, "certifications": p.certifications, "revoked": p.revoked, "workers": p.worker_count, "created_unix": p.created_unix})
}

/// Runs `sovra provider …`.
pub async fn provider(cmd: ProviderCommand, conn: &ConnectArgs) -> Result<()> {
    let mut client = pb::providers_client::ProvidersClient::new(conn.channel().await?);
    match cmd {
        ProviderCommand::Add {
            name,
            country,
            certifications,
        } => {
            let p = client
                .add_provider(pb::AddProviderRequest {
                    name,
                    country,
                    certifications,
                })
                .await
                .map_err(status)?
                .into_inner();
            emit(conn.json, provider_json(&p), || {
                println!("provider {} added ({})", p.name, p.country)
            });
        }
        ProviderCommand::List => {
            let list = client
                .list_providers(pb::ListProvidersRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .providers;
            emit(
                conn.json,
                Value::Array(list.iter().map(provider_json).collect()),
                || {
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|p| {
                            vec![
                                p.name.clone(),
                                p.country.clone(),
                                p.certifications.join(","),
                                if p.revoked { "revoked" } else { "active" }.into(),
                                p.worker_count.to_string(),
                            ]
                        })
                        .collect();
                    table(
                        &["provider", "country", "certifications", "state", "workers"],
                        &rows,
                    );
                },
            );
        }
        ProviderCommand::JoinToken { name, ttl } => {
            let r = client
                .create_join_token(pb::CreateJoinTokenRequest {
                    provider: name,
                    ttl_seconds: ttl.as_secs().max(1),
                })
                .await
                .map_err(status)?
                .into_inner();
            emit(
                conn.json,
                json!({"token": r.token, "expires_unix": r.expires_unix}),
                || println!("{}", r.token),
            );
        }
        ProviderCommand::Revoke { name } => {
            let p = client
                .revoke_provider(pb::RevokeProviderRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            emit(conn.json, provider_json(&p), || {
                println!("provider {} revoked", p.name)
            });
        }
    }
    Ok(())
}

/// `sovra tenant …`.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant and print its API token (shown once).
    Add {
        /// Tenant name.
        name: String,
        /// Most jobs it may run at once (default: the coordinator's, 64).
        #[arg(long)]
        max_jobs: Option<u32>,
    },
    /// List tenants.
    List,
    /// Revoke a tenant: its token stops working and its running jobs are cancelled (its
    /// jobs' records stay).
    Revoke {
        /// Tenant name.
        name: String,
    },
    /// Issue a tenant a new token, printed once (the old one stops working; lifts a
    /// revocation).
    RotateToken {
        /// Tenant name.
        name: String,
    },
    /// Set how many jobs a tenant may run at once (its jobs beyond a lowered limit go on;
    /// new ones are refused until fewer run).
    Limit {
        /// Tenant name.
        name: String,
        /// Most jobs at once; 0 gives it the coordinator's default.
        #[arg(long)]
        max_jobs: u32,
    },
}

fn tenant_json(t: &pb::Tenant) -> Value {
    json!({
        "name": t.name,
        "created_unix": t.created_unix,
        "revoked": t.revoked,
        "max_running_jobs": t.max_running_jobs,
        "own_max_running_jobs": t.own_max_running_jobs,
    })
}

/// Runs `sovra tenant …`.
pub async fn tenant(cmd: TenantCommand, conn: &ConnectArgs) -> Result<()> {
    let mut client = pb::tenants_client::TenantsClient::new(conn.channel().await?);
    match cmd {
        TenantCommand::Add { .. } | TenantCommand::RotateToken { .. } => {
            let r = match cmd {
                TenantCommand::Add { name, max_jobs } => {
                    client
                        .add_tenant(pb::AddTenantRequest {
                            name,
                            max_running_jobs: max_jobs.unwrap_or(0),
                        })
                        .await
                }
                TenantCommand::RotateToken { name } => {
                    client.rotate_tenant_token(pb::TenantRef { name }).await
                }
                _ => unreachable!("matched above"),
            }
            .map_err(status)?
            .into_inner();
            emit(conn.json, json!({"name": r.name, "token": r.token}), || {
                println!("{}", r.token)
            });
        }
        TenantCommand::List => {
            let list = client
                .list_tenants(pb::ListTenantsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .tenants;
            emit(
                conn.json,
                Value::Array(list.iter().map(tenant_json).collect()),
                || {
                    table(
                        &["tenant", "state", "max jobs"],
                        &list
                            .iter()
                            .map(|t| {
                                let state = if t.revoked { "revoked" } else { "active" };
                                let limit = if t.own_max_running_jobs == 0 {
                                    format!("{} (default)", t.max_running_jobs)
                                } else {
                                    t.max_running_jobs.to_string()
                                };
                                vec![t.name.clone(), state.into(), limit]
                            })
                            .collect::<Vec<_>>(),
                    );
                },
            );
        }
        TenantCommand::Revoke { name } => {
            let t = client
                .revoke_tenant(pb::TenantRef { name })
                .await
                .map_err(status)?
                .into_inner();
            emit(conn.json, tenant_json(&t), || {
                println!("tenant {} revoked; its token no longer works", t.name)
            });
        }
        TenantCommand::Limit { name, max_jobs } => {
            let t = client
                .set_tenant_limit(pb::SetTenantLimitRequest {
                    name,
                    max_running_jobs: max_jobs,
                })
                .await
                .map_err(status)?
                .into_inner();
            emit(conn.json, tenant_json(&t), || {
                println!(
                    "tenant {} may run {} jobs at once",
                    t.name, t.max_running_jobs
                )
            });
        }
    }
    Ok(())
}

/// Runs `sovra coordinator rotate-token`.
pub async fn rotate_operator_token(conn: &ConnectArgs) -> Result<()> {
    let mut client = pb::coordinator_client::CoordinatorClient::new(conn.channel().await?);
    let r = client
        .rotate_operator_token(pb::RotateOperatorTokenRequest {})
        .await
        .map_err(status)?
        .into_inner();
    if !r.write_error.is_empty() {
        eprintln!(
            "warning: the coordinator could not store the new token ({}); keep the one printed here",
            r.write_error
        );
    }
    emit(
        conn.json,
        json!({"token": r.token, "token_file": r.token_file, "write_error": r.write_error}),
        || {
            eprintln!(
                "the old operator token no longer works; the coordinator wrote the new one to {}",
                r.token_file
            );
            println!("{}", r.token)
        },
    );
    Ok(())
}

/// Runs `sovra worker revoke`.
pub async fn worker_revoke(id: String, conn: &ConnectArgs) -> Result<()> {
    let mut client = pb::workers_client::WorkersClient::new(conn.channel().await?);
    let w = client
        .revoke_worker(pb::RevokeWorkerRequest { worker_id: id })
        .await
        .map_err(status)?
        .into_inner();
    emit(
        conn.json,
        json!({"id": w.id, "provider": w.provider, "state": w.state}),
        || println!("worker {} of {} revoked", w.id, w.provider),
    );
    Ok(())
}

/// Runs `sovra worker list`.
pub async fn worker_list(conn: &ConnectArgs) -> Result<()> {
    let mut client = pb::workers_client::WorkersClient::new(conn.channel().await?);
    let list = client
        .list_workers(pb::ListWorkersRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .workers;
    let docs: Vec<Value> = list
        .iter()
        .map(|w| {
            let d = w.device.clone().unwrap_or_default();
            json!({"id": w.id, "provider": w.provider, "country": w.country, "state": w.state, "device": d.kind, "device_name": d.name, "device_memory_bytes": d.memory_bytes, "offered_memory_bytes": w.offered_memory_bytes, "held_memory_bytes": w.held_memory_bytes, "speed_gflops": w.speed_gflops, "advertise_addr": w.advertise_addr, "last_seen_unix": w.last_seen_unix, "open_sessions": w.open_sessions, "kv_cache_bytes": w.kv_cache_bytes})
        })
        .collect();
    emit(conn.json, Value::Array(docs), || {
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|w| {
                let kind = w
                    .device
                    .as_ref()
                    .map(|d| d.kind.clone())
                    .unwrap_or_default();
                vec![
                    w.id.clone(),
                    w.provider.clone(),
                    w.country.clone(),
                    w.state.clone(),
                    kind,
                    human_bytes(w.offered_memory_bytes),
                    human_bytes(w.held_memory_bytes),
                    format!("{:.1}", w.speed_gflops),
                    w.advertise_addr.clone(),
                ]
            })
            .collect();
        table(
            &[
                "worker", "provider", "country", "state", "device", "memory", "held", "gflop/s",
                "address",
            ],
            &rows,
        );
    });
    Ok(())
}

/// Runs `sovra worker links`.
pub async fn worker_links(conn: &ConnectArgs) -> Result<()> {
    let mut client = pb::workers_client::WorkersClient::new(conn.channel().await?);
    let links = client
        .list_links(pb::ListLinksRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .links;
    let docs: Vec<Value> = links
        .iter()
        .map(|l| {
            let rtt_us = (l.error.is_empty()).then_some(l.rtt_us);
            json!({"from": l.from_worker, "to": l.to_worker, "rtt_us": rtt_us, "error": l.error, "age_s": l.age_s})
        })
        .collect();
    emit(conn.json, Value::Array(docs), || {
        let rows: Vec<Vec<String>> = links
            .iter()
            .map(|l| {
                let rtt = if l.error.is_empty() {
                    format!("{:.2}", l.rtt_us as f64 / 1000.0)
                } else {
                    format!("unreachable: {}", l.error)
                };
                vec![
                    l.from_worker.clone(),
                    l.to_worker.clone(),
                    rtt,
                    format!("{} s ago", l.age_s),
                ]
            })
            .collect();
        table(&["from", "to", "rtt ms", "measured"], &rows);
    });
    Ok(())
}

/// Arguments of `sovra model add`.
#[derive(Debug, Args)]
pub struct ModelAddArgs {
    /// Name the federation will know the model by.
    pub name: String,
    /// The GGUF file (or a known model name such as smollm2).
    #[arg(long)]
    pub file: String,
    /// Weight mode the workers load it in: gguf, q8_0 or f32.
    #[arg(long, default_value_t = WeightMode::DEFAULT)]
    pub dtype: WeightMode,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// Sovereignty flags: where layers may run (a job's narrow its model's).
#[derive(Debug, Clone, Default, Args)]
pub struct PolicyArgs {
    /// Countries the layers may run in, comma-separated (default: any).
    #[arg(long, value_delimiter = ',')]
    pub country: Vec<String>,
    /// Certifications every provider used must hold (repeatable or comma-separated).
    #[arg(long = "require-cert", value_delimiter = ',')]
    pub require_cert: Vec<String>,
    /// Providers never to use (repeatable or comma-separated).
    #[arg(long = "exclude-provider", value_delimiter = ',')]
    pub exclude_provider: Vec<String>,
}

impl PolicyArgs {
    /// The protobuf policy.
    pub fn to_pb(&self) -> pb::Policy {
        pb::Policy {
            countries: self.country.clone(),
            required_certifications: self.require_cert.clone(),
            excluded_providers: self.exclude_provider.clone(),
        }
    }
}

/// Runs `sovra model add`.
pub async fn model_add(args: ModelAddArgs, conn: &ConnectArgs) -> Result<()> {
    let path = resolve_model(&args.file, &sovra_home(), &mut crate::progress)?;
    let path =
        std::fs::canonicalize(&path).with_context(|| format!("resolving {}", path.display()))?;
    let gguf = GgufModel::open(&path)?;
    let sha = sha256_file(&path)?;
    let request = pb::AddModelRequest {
        name: args.name,
        spec: Some(spec_pb(gguf.spec())),
        file_sha256: sha,
        file_name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        file_path: path.display().to_string(),
        dtype: args.dtype.to_string(),
        policy: Some(args.policy.to_pb()),
    };
    let mut client = pb::models_client::ModelsClient::new(conn.channel().await?);
    let m = client
        .add_model(request)
        .await
        .map_err(status)?
        .into_inner();
    emit(conn.json, model_json(&m), || {
        println!(
            "model {} added ({} layers, {} in {})",
            m.name,
            m.spec.as_ref().map_or(0, |s| s.layers),
            human_bytes(m.weight_bytes),
            m.dtype
        )
    });
    Ok(())
}

fn model_json(m: &pb::Model) -> Value {
    let p = m.policy.clone().unwrap_or_default();
    json!({"name": m.name, "layers": m.spec.as_ref().map(|s| s.layers), "dtype": m.dtype, "weight_bytes": m.weight_bytes, "file_sha256": m.file_sha256, "file_path": m.file_path, "policy": {"countries": p.countries, "required_certifications": p.required_certifications, "excluded_providers": p.excluded_providers}})
}

/// Runs `sovra model list`.
pub async fn model_list(conn: &ConnectArgs) -> Result<()> {
    let mut client = pb::models_client::ModelsClient::new(conn.channel().await?);
    let list = client
        .list_models(pb::ListModelsRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .models;
    emit(
        conn.json,
        Value::Array(list.iter().map(model_json).collect()),
        || {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|m| {
                    let p = m.policy.clone().unwrap_or_default();
                    vec![
                        m.name.clone(),
                        m.spec.as_ref().map_or(0, |s| s.layers).to_string(),
                        m.dtype.clone(),
                        human_bytes(m.weight_bytes),
                        if p.countries.is_empty() {
                            "any".into()
                        } else {
                            p.countries.join(",")
                        },
                    ]
                })
                .collect();
            table(&["model", "layers", "dtype", "weights", "countries"], &rows);
        },
    );
    Ok(())
}

/// Runs `sovra model remove`.
pub async fn model_remove(name: String, conn: &ConnectArgs) -> Result<()> {
    let mut client = pb::models_client::ModelsClient::new(conn.channel().await?);
    let m = client
        .remove_model(pb::RemoveModelRequest { name })
        .await
        .map_err(status)?
        .into_inner();
    emit(conn.json, model_json(&m), || {
        println!("model {} removed; its workers drop their slices", m.name)
    });
    Ok(())
}

/// `sovra placement …`.
#[derive(Debug, Subcommand)]
pub enum PlacementCommand {
    /// Show which worker runs which layers of a model.
    Show {
        /// Model name.
        model: String,
    },
    /// Replan a model: automatically, with N stages, or with explicit half-open ranges.
    Set {
        /// Model name.
        model: String,
        /// Chains of exactly N stages: one, plus replica chains on the workers left over.
        #[arg(long, conflicts_with = "layers")]
        stages: Option<u32>,
        /// Explicit stages: WORKER=START..END,… in layer order.
        #[arg(long)]
        layers: Option<String>,
    },
}

fn parse_layers(text: &str) -> Result<Vec<pb::StageAssignment>> {
    text.split(',')
        .map(|part| {
            let (worker, range) = part
                .split_once('=')
                .ok_or_else(|| anyhow!("`{part}` is not WORKER=START..END"))?;
            let range: LayerRange = range.parse().map_err(|e: String| anyhow!(e))?;
            let layer = |n: usize| {
                u32::try_from(n).map_err(|_| anyhow!("`{part}`: layer {n} is out of range"))
            };
            Ok(pb::StageAssignment {
                worker_id: worker.trim().to_string(),
                start_layer: layer(range.start)?,
                end_layer: layer(range.end)?,
            })
        })
        .collect()
}

/// Runs `sovra placement …`.
pub async fn placement(cmd: PlacementCommand, conn: &ConnectArgs) -> Result<()> {
    // A malformed layer list is refused before the coordinator is asked.
    let explicit = match &cmd {
        PlacementCommand::Set {
            stages: None,
            layers: Some(l),
            ..
        } => Some(parse_layers(l)?),
        _ => None,
    };
    let mut client = pb::placements_client::PlacementsClient::new(conn.channel().await?);
    let p = match cmd {
        PlacementCommand::Show { model } => {
            client
                .show_placement(pb::ShowPlacementRequest { model })
                .await
        }
        PlacementCommand::Set { model, stages, .. } => {
            use pb::set_placement_request::How;
            let how = match (stages, explicit) {
                (Some(n), _) => How::Stages(n),
                (None, Some(stages)) => How::Explicit(pb::ExplicitChain { stages }),
                (None, None) => How::Auto(true),
            };
            client
                .set_placement(pb::SetPlacementRequest {
                    model,
                    how: Some(how),
                })
                .await
        }
    }
    .map_err(status)?
    .into_inner();
    print_placement(&p, conn.json);
    Ok(())
}

fn state_name(state: i32) -> &'static str {
    match pb::AssignmentState::try_from(state) {
        Ok(pb::AssignmentState::Loading) => "loading",
        Ok(pb::AssignmentState::Ready) => "ready",
        Ok(pb::AssignmentState::Failed) => "failed",
        Ok(pb::AssignmentState::Down) => "down",
        _ => "assigned",
    }
}

/// Prints a placement as a table (or JSON).
pub fn print_placement(p: &pb::Placement, json_mode: bool) {
    let chains: Vec<Value> = p
        .chains
        .iter()
        .map(|c| {
            let ring = c.ring_measured.then_some(c.ring_ms);
            json!({"bottleneck_ms": c.bottleneck_ms, "ring_ms": ring, "stages": c.stages.iter().map(|s| json!({"worker": s.worker_id, "provider": s.provider, "country": s.country, "layers": format!("{}..{}", s.start_layer, s.end_layer), "start_layer": s.start_layer, "end_layer": s.end_layer, "memory_bytes": s.memory_bytes, "state": state_name(s.state), "message": s.message})).collect::<Vec<_>>()})
        })
        .collect();
    let doc = json!({"model": p.model, "version": p.version, "requested": p.requested, "degraded": p.degraded, "not_as_asked": if p.not_as_asked.is_empty() { Value::Null } else { json!(p.not_as_asked) }, "chains": chains, "unplaced_reason": if p.unplaced_reason.is_empty() { Value::Null } else { json!(p.unplaced_reason) }});
    emit(json_mode, doc, || {
        if p.chains.is_empty() {
            println!("{} is not placed: {}", p.model, p.unplaced_reason);
            if !p.unplaced_reason.is_empty() {
                println!("(placed as soon as the available workers allow)");
            }
            return;
        }
        if p.degraded {
            println!(
                "{} · placement v{} · degraded: not as asked ({})",
                p.model, p.version, p.requested
            );
            if p.not_as_asked.is_empty() {
                println!(
                    "planned around unavailable workers or within the memory they offer; placed as asked again once they allow it"
                );
            } else {
                println!("why: {}", p.not_as_asked);
            }
        } else {
            println!("{} · placement v{} · {}", p.model, p.version, p.requested);
        }
        let mut rows = Vec::new();
        for (i, c) in p.chains.iter().enumerate() {
            for s in &c.stages {
                rows.push(vec![
                    i.to_string(),
                    s.worker_id.clone(),
                    s.provider.clone(),
                    s.country.clone(),
                    format!("{}..{}", s.start_layer, s.end_layer),
                    human_bytes(s.memory_bytes),
                    state_name(s.state).into(),
                    s.message.clone(),
                ]);
            }
        }
        table(
            &[
                "chain", "worker", "provider", "country", "layers", "memory", "state", "detail",
            ],
            &rows,
        );
        for (i, c) in p.chains.iter().enumerate() {
            let ring = if !c.ring_measured {
                "not measured yet".to_string()
            } else if c.ring_ms >= 60_000.0 {
                "unreachable (a link of it could not be reached)".to_string()
            } else {
                format!("{:.2} ms", c.ring_ms)
            };
            println!(
                "chain {i}: slowest stage {:.2} ms per token; links around the ring {ring}",
                c.bottleneck_ms
            );
        }
    });
}
