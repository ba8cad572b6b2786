//! The gRPC `Jobs` service: tenants run jobs and stream their tokens, list, read and cancel
//! their own jobs; the operator sees every job.

use std::pin::Pin;

use futures::Stream;
use sovra_model::{SamplingParams, StopConditions};
use sovra_proto::pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::federation::Caller;
use crate::jobs::{AuditStage, JobEvent, JobRecord, JobSpec};
use crate::records::PolicyRecord;
use crate::service::{ControlPlane, bearer};

/// Protobuf form of sampling and stopping settings.
pub fn sampling_pb(s: &SamplingParams, stop: &StopConditions) -> pb::Sampling {
    pb::Sampling {
        temperature: s.temperature,
        top_k: s.top_k.unwrap_or(0) as u32,
        top_p: s.top_p.unwrap_or(0.0),
        seed: s.seed,
        max_tokens: stop.max_tokens.min(u32::MAX as usize) as u32,
        stop: stop.stop.clone(),
        ignore_eos: stop.ignore_eos,
    }
}

/// Domain form of protobuf sampling settings (0 means "unset" for top-k and top-p).
pub fn sampling_from_pb(s: &pb::Sampling) -> (SamplingParams, StopConditions) {
    (
        SamplingParams {
            temperature: s.temperature,
            top_k: (s.top_k > 0).then_some(s.top_k as usize),
            top_p: (s.top_p != 0.0).then_some(s.top_p),
            seed: s.seed,
        },
        StopConditions {
            max_tokens: s.max_tokens as usize,
            stop: s.stop.clone(),
            ignore_eos: s.ignore_eos,
        },
    )
}

fn audit_pb(a: &AuditStage) -> pb::AuditStage {
    pb::AuditStage {
        worker_id: a.worker_id.clone(),
        provider: a.provider.clone(),
        country: a.country.clone(),
        start_layer: a.range.start as u32,
        end_layer: a.range.end as u32,
        attempt: a.attempt,
        from_token: a.from_token as u64,
    }
}

fn job_pb(j: JobRecord) -> pb::Job {
    pb::Job {
        job_id: j.id,
        tenant: j.tenant,
        model: j.model,
        state: j.state.as_str().to_string(),
        prompt_tokens: j.prompt_tokens as u32,
        generated_tokens: j.token_ids.len() as u32,
        token_ids: j.token_ids,
        text: j.text,
        finish_reason: j.finish_reason.unwrap_or_default(),
        error: j.error.unwrap_or_default(),
        audit: j.audit.iter().map(audit_pb).collect(),
        created_unix: j.created_unix,
        finished_unix: j.finished_unix,
        policy: Some(pb::Policy {
            countries: j.policy.countries,
            required_certifications: j.policy.required_certifications,
            excluded_providers: j.policy.excluded_providers,
        }),
    }
}

fn event_pb(event: JobEvent) -> Result<pb::JobEvent, Status> {
    use pb::job_event::Kind;
    let kind = match event {
        JobEvent::Started { job_id, stages } => Kind::Started(pb::JobStarted {
            job_id,
            stages: stages.iter().map(audit_pb).collect(),
        }),
        JobEvent::Token {
            index,
            token_id,
            text,
        } => Kind::Token(pb::TokenEvent {
            index,
            token_id,
            text,
        }),
        JobEvent::Summary(s) => Kind::Summary(pb::JobSummary {
            job_id: s.job_id,
            prompt_tokens: s.prompt_tokens as u32,
            generated_tokens: s.generated_tokens as u32,
            finish_reason: s.finish_reason,
            ttft_ms: s.ttft_ms,
            prompt_tok_s: s.prompt_tok_s,
            decode_tok_s: s.decode_tok_s,
        }),
        JobEvent::Cancelled(reason) => return Err(Status::cancelled(reason)),
        JobEvent::Failed(reason) => return Err(Status::aborted(reason)),
    };
    Ok(pb::JobEvent { kind: Some(kind) })
}

type JobStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

impl ControlPlane {
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        Ok(self.federation().authenticate(bearer(request).as_deref())?)
    }
}

#[tonic::async_trait]
impl pb::jobs_server::Jobs for ControlPlane {
    type RunJobStream = JobStream;

    async fn run_job(
        &self,
        request: Request<pb::RunJobRequest>,
    ) -> Result<Response<JobStream>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let sampling = r.sampling.unwrap_or_default();
        let (sampling, stop) = sampling_from_pb(&sampling);
        let policy = r.policy.unwrap_or_default();
        let spec = JobSpec {
            model: r.model,
            chat: r.chat || !r.system.is_empty(),
            system: (!r.system.is_empty()).then_some(r.system),
            prompt: r.prompt,
            turns: Vec::new(),
            sampling,
            stop,
            policy: PolicyRecord {
                countries: policy.countries,
                required_certifications: policy.required_certifications,
                excluded_providers: policy.excluded_providers,
            },
        };
        let (_, mut events) = self.federation().run_job(&caller, spec).await?;
        // Relays events until the summary or the first error. A client that goes away drops
        // the stream's receiver; the relay then drops `events`, which cancels the job (at the
        // watchdog's next round, or at the next token if that comes first).
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = events.recv() => match event {
                        Some(event) => event,
                        None => break,
                    },
                    () = tx.closed() => break,
                };
                let item = event_pb(event);
                let last = matches!(
                    &item,
                    Err(_)
                        | Ok(pb::JobEvent {
                            kind: Some(pb::job_event::Kind::Summary(_))
                        })
                );
                if tx.send(item).await.is_err() || last {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let before = (!r.before.is_empty()).then_some(r.before.as_str());
        let page = self
            .federation()
            .list_jobs(&caller, r.limit as usize, before)?;
        let jobs = page
            .jobs
            .into_iter()
            .map(|j| pb::Job {
                token_ids: vec![],
                text: String::new(),
                ..job_pb(j)
            })
            .collect();
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            more: page.more,
        }))
    }

    async fn get_job(&self, request: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&request)?;
        Ok(Response::new(job_pb(
            self.federation()
                .get_job(&caller, &request.into_inner().job_id)?,
        )))
    }

    async fn cancel_job(&self, request: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let caller = self.caller(&request)?;
        Ok(Response::new(job_pb(
            self.federation()
                .cancel_job(&caller, &request.into_inner().job_id)?,
        )))
    }
}
