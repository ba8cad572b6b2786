//! `TestFederation`: a real coordinator (TLS, sled on disk) on port 0 in this process, and real
//! workers joining it, each torn down when dropped.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sovra_coordinator::federation::{Federation, FederationConfig};
use sovra_coordinator::server::{self, CoordinatorConfig};
use sovra_proto::channel::{AuthChannel, connect};
use sovra_proto::pb;
use sovra_worker::agent::{self, WorkerConfig, WorkerError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A coordinator running in this process.
pub struct TestFederation {
    /// Its data dir (kept until drop).
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The CA certificate.
    pub ca_pem: String,
    /// The operator token.
    pub operator_token: String,
    /// The federation state.
    pub fed: Arc<Federation>,
    /// Batch wait of the workers started from now on.
    pub worker_batch_wait: Duration,
    /// The memory the workers of `fleet_in` offer (None: what the machine has).
    pub worker_max_memory: Option<u64>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

/// A worker running in this process.
pub struct TestWorker {
    /// Its data dir.
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    /// The worker task; its result says why it stopped.
    pub task: Option<JoinHandle<Result<(), WorkerError>>>,
}

/// Installs the ring crypto provider once.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl TestFederation {
    /// Starts a coordinator with a short lease.
    pub async fn start() -> Self {
        Self::start_with(FederationConfig {
            heartbeat_interval: Duration::from_millis(200),
            lease: Duration::from_millis(1500),
            ..FederationConfig::default()
        })
        .await
    }

    /// Starts a coordinator with `config`.
    pub async fn start_with(config: FederationConfig) -> Self {
        init_crypto();
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = CoordinatorConfig {
            data_dir: dir.path().join("coordinator"),
            federation: config,
        };
        let fed = server::open(&cfg).expect("opening the federation");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("https://{}", listener.local_addr().expect("addr"));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn({
            let fed = fed.clone();
            async move {
                server::run(fed, listener, async {
                    let _ = stopped.await;
                })
                .await
                .expect("coordinator server");
            }
        });
        let ca_pem = std::fs::read_to_string(cfg.data_dir.join("ca.pem")).expect("ca.pem");
        let operator_token = std::fs::read_to_string(cfg.data_dir.join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_string();
        Self {
            dir,
            url,
            ca_pem,
            operator_token,
            fed,
            worker_batch_wait: Duration::ZERO,
            worker_max_memory: None,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Serves the OpenAI-compatible HTTP API on a free loopback port (until the test ends);
    /// returns its `host:port`.
    pub async fn start_http_api(&self) -> String {
        self.serve_http_api(std::future::pending()).await.0
    }

    /// Serves the OpenAI-compatible HTTP API on a free loopback port until the returned sender
    /// is used (or dropped); returns its `host:port` and the server's task.
    pub async fn start_http_api_until_stopped(
        &self,
    ) -> (
        String,
        oneshot::Sender<()>,
        JoinHandle<Result<(), sovra_coordinator::error::CoordinatorError>>,
    ) {
        let (stop, stopped) = oneshot::channel::<()>();
        let (addr, server) = self
            .serve_http_api(async {
                let _ = stopped.await;
            })
            .await;
        (addr, stop, server)
    }

    /// Serves the OpenAI-compatible HTTP API on a free loopback port until `shutdown`.
    async fn serve_http_api(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> (
        String,
        JoinHandle<Result<(), sovra_coordinator::error::CoordinatorError>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let acceptor = sovra_coordinator::openai::tls_acceptor(&self.fed).expect("TLS");
        let server = tokio::spawn(sovra_coordinator::openai::serve(
            self.fed.clone(),
            acceptor,
            listener,
            shutdown,
        ));
        (addr, server)
    }

    /// A channel carrying `token`.
    pub async fn channel(&self, token: Option<&str>) -> AuthChannel {
        connect(&self.url, &self.ca_pem, None, token)
            .await
            .expect("connecting")
    }

    /// A channel carrying the operator token.
    pub async fn operator(&self) -> AuthChannel {
        self.channel(Some(&self.operator_token.clone())).await
    }

    /// Adds a provider.
    pub async fn add_provider(&self, name: &str, country: &str, certs: &[&str]) {
        pb::providers_client::ProvidersClient::new(self.operator().await)
            .add_provider(pb::AddProviderRequest {
                name: name.into(),
                country: country.into(),
                certifications: certs.iter().map(|c| c.to_string()).collect(),
            })
            .await
            .expect("add provider");
    }

    /// Adds a tenant and returns its token.
    pub async fn add_tenant(&self, name: &str) -> String {
        pb::tenants_client::TenantsClient::new(self.operator().await)
            .add_tenant(pb::AddTenantRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .expect("add tenant")
            .into_inner()
            .token
    }

    /// A join token for `provider`.
    pub async fn join_token(&self, provider: &str, ttl_seconds: u64) -> String {
        pb::providers_client::ProvidersClient::new(self.operator().await)
            .create_join_token(pb::CreateJoinTokenRequest {
                provider: provider.into(),
                ttl_seconds,
            })
            .await
            .expect("join token")
            .into_inner()
            .token
    }

    /// The placement of `model`.
    pub async fn placement(&self, model: &str) -> pb::Placement {
        pb::placements_client::PlacementsClient::new(self.operator().await)
            .show_placement(pb::ShowPlacementRequest {
                model: model.into(),
            })
            .await
            .expect("show placement")
            .into_inner()
    }

    /// Waits until `count` workers are up.
    pub async fn wait_for_workers_up(&self, count: usize) {
        eventually("the workers up", Duration::from_secs(60), || async {
            (self
                .workers()
                .await
                .iter()
                .filter(|w| w.state == "up")
                .count()
                == count)
                .then_some(())
        })
        .await;
    }

    /// Every provider, as the operator lists them.
    pub async fn providers(&self) -> Vec<pb::Provider> {
        pb::providers_client::ProvidersClient::new(self.operator().await)
            .list_providers(pb::ListProvidersRequest {})
            .await
            .expect("list providers")
            .into_inner()
            .providers
    }

    /// Every worker, as the operator lists them.
    pub async fn workers(&self) -> Vec<pb::Worker> {
        pb::workers_client::WorkersClient::new(self.operator().await)
            .list_workers(pb::ListWorkersRequest {})
            .await
            .expect("list workers")
            .into_inner()
            .workers
    }

    /// The round trips the workers measured to each other, as the operator lists them.
    pub async fn links(&self) -> Vec<pb::Link> {
        pb::workers_client::WorkersClient::new(self.operator().await)
            .list_links(pb::ListLinksRequest {})
            .await
            .expect("list links")
            .into_inner()
            .links
    }

    /// Starts a worker with a fresh data dir.
    pub fn start_worker(&self, token: Option<String>, max_memory: Option<u64>) -> TestWorker {
        let data_dir = tempfile::tempdir().expect("tempdir").keep();
        self.start_worker_in(data_dir, token, max_memory)
    }

    /// Starts a worker on `data_dir` (reusing its identity if it has one).
    pub fn start_worker_in(
        &self,
        data_dir: PathBuf,
        token: Option<String>,
        max_memory: Option<u64>,
    ) -> TestWorker {
        let any_port = "127.0.0.1:0".parse().expect("addr");
        self.start_worker_at(data_dir, token, max_memory, any_port, None)
    }

    /// Starts a worker on `data_dir` whose data plane listens on `listen` and is dialed at
    /// `advertise` (default: where it listens).
    pub fn start_worker_at(
        &self,
        data_dir: PathBuf,
        token: Option<String>,
        max_memory: Option<u64>,
        listen: std::net::SocketAddr,
        advertise: Option<String>,
    ) -> TestWorker {
        let config = WorkerConfig {
            coordinator: self.url.clone(),
            join_token: token,
            data_dir: data_dir.clone(),
            listen,
            advertise,
            max_memory,
            models_dir: None,
            batch_wait: self.worker_batch_wait,
            cpus: None,
            probe_interval: Duration::from_secs(60),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(agent::run(config, async {
            let _ = stopped.await;
        }));
        TestWorker {
            data_dir,
            stop: Some(stop),
            task: Some(task),
        }
    }
}

impl Drop for TestFederation {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

impl TestWorker {
    /// Stops the worker and waits for it.
    pub async fn stop(mut self) -> Result<(), WorkerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.expect("worker task"),
            None => Ok(()),
        }
    }

    /// Waits for the worker to stop by itself (within `timeout`).
    pub async fn finished(&mut self, timeout: Duration) -> Option<Result<(), WorkerError>> {
        let task = self.task.as_mut()?;
        match tokio::time::timeout(timeout, task).await {
            Ok(result) => {
                self.task = None;
                Some(result.expect("worker task"))
            }
            Err(_) => None,
        }
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Polls `check` every 50 ms until it returns Some, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A federation with one worker per provider of `providers` (name, country), the SmolLM2
/// model registered in `dtype`, and a tenant; returns the tenant's token too.
pub async fn fleet(
    providers: &[(&str, &str)],
    dtype: &str,
) -> (TestFederation, Vec<TestWorker>, String) {
    fleet_with(providers, dtype, Duration::ZERO).await
}

/// As [`fleet`], with workers whose head stages wait up to `batch_wait` to batch sessions.
pub async fn fleet_with(
    providers: &[(&str, &str)],
    dtype: &str,
    batch_wait: Duration,
) -> (TestFederation, Vec<TestWorker>, String) {
    let mut fed = TestFederation::start().await;
    fed.worker_batch_wait = batch_wait;
    fleet_in(fed, providers, dtype).await
}

/// The request that registers SmolLM2 as `smollm2` in weight mode `dtype`, with no policy.
pub fn smollm2_model(dtype: &str) -> pb::AddModelRequest {
    let path = crate::smollm2_path();
    let model = sovra_model::GgufModel::open(&path).expect("model");
    pb::AddModelRequest {
        name: "smollm2".into(),
        spec: Some(sovra_coordinator::service::spec_pb(model.spec())),
        file_sha256: sovra_model::fetch::sha256_file(&path).expect("hash"),
        file_name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        file_path: path.display().to_string(),
        dtype: dtype.into(),
        policy: Some(pb::Policy::default()),
    }
}

/// As [`fleet`], on the federation `fed`.
pub async fn fleet_in(
    fed: TestFederation,
    providers: &[(&str, &str)],
    dtype: &str,
) -> (TestFederation, Vec<TestWorker>, String) {
    let mut workers = Vec::new();
    for (name, country) in providers {
        fed.add_provider(name, country, &["ISO27001"]).await;
        workers
            .push(fed.start_worker(Some(fed.join_token(name, 600).await), fed.worker_max_memory));
    }
    fed.wait_for_workers_up(providers.len()).await;
    pb::models_client::ModelsClient::new(fed.operator().await)
        .add_model(smollm2_model(dtype))
        .await
        .expect("add model");
    let tenant = fed.add_tenant("acme").await;
    (fed, workers, tenant)
}

impl TestFederation {
    /// Places `model` with `how` and waits until every stage is ready.
    pub async fn place(&self, model: &str, how: pb::set_placement_request::How) -> pb::Placement {
        let mut placements = pb::placements_client::PlacementsClient::new(self.operator().await);
        let placed = placements
            .set_placement(pb::SetPlacementRequest {
                model: model.into(),
                how: Some(how),
            })
            .await
            .expect("set placement")
            .into_inner();
        let version = placed.version;
        eventually("every stage ready", Duration::from_secs(60), || {
            let mut placements = placements.clone();
            async move {
                let p = placements
                    .show_placement(pb::ShowPlacementRequest {
                        model: model.into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                let ready = p.version == version
                    && p.chains
                        .iter()
                        .flat_map(|c| &c.stages)
                        .all(|s| s.state == pb::AssignmentState::Ready as i32);
                ready.then_some(p)
            }
        })
        .await
    }
}

/// What a finished job streamed.
#[derive(Debug, Clone)]
pub struct JobOutput {
    /// Job id.
    pub job_id: String,
    /// Stages it ran on.
    pub stages: Vec<pb::AuditStage>,
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// The summary.
    pub summary: pb::JobSummary,
}

/// Runs a job and collects its stream.
pub async fn run_job(
    channel: AuthChannel,
    request: pb::RunJobRequest,
) -> Result<JobOutput, tonic::Status> {
    let mut stream = pb::jobs_client::JobsClient::new(channel)
        .run_job(request)
        .await?
        .into_inner();
    let mut out = JobOutput {
        job_id: String::new(),
        stages: vec![],
        tokens: vec![],
        text: String::new(),
        summary: Default::default(),
    };
    while let Some(event) = stream.message().await? {
        match event.kind {
            Some(pb::job_event::Kind::Started(s)) => {
                out.job_id = s.job_id;
                out.stages = s.stages;
            }
            Some(pb::job_event::Kind::Token(t)) => {
                assert_eq!(
                    t.index as usize,
                    out.tokens.len(),
                    "token indices are consecutive"
                );
                out.tokens.push(t.token_id);
                out.text.push_str(&t.text);
            }
            Some(pb::job_event::Kind::Summary(s)) => {
                out.summary = s;
                return Ok(out);
            }
            None => {}
        }
    }
    Err(tonic::Status::internal("stream ended without a summary"))
}

/// Starts a job and returns its id and the rest of its stream, once the coordinator said it
/// started.
pub async fn start_job(
    channel: AuthChannel,
    request: pb::RunJobRequest,
) -> (String, tonic::Streaming<pb::JobEvent>) {
    let mut stream = pb::jobs_client::JobsClient::new(channel)
        .run_job(request)
        .await
        .expect("run job")
        .into_inner();
    loop {
        let event = stream.message().await.expect("job stream");
        match event.and_then(|e| e.kind) {
            Some(pb::job_event::Kind::Started(s)) => return (s.job_id, stream),
            Some(_) => continue,
            None => panic!("the job stream ended before the job started"),
        }
    }
}

/// A chat job request.
pub fn chat_request(
    prompt: &str,
    max_tokens: u32,
    temperature: f32,
    seed: u64,
) -> pb::RunJobRequest {
    pb::RunJobRequest {
        model: "smollm2".into(),
        prompt: prompt.into(),
        chat: true,
        system: String::new(),
        sampling: Some(pb::Sampling {
            temperature,
            top_k: 0,
            top_p: 0.0,
            seed,
            max_tokens,
            stop: vec![],
            ignore_eos: true,
        }),
        policy: None,
    }
}
