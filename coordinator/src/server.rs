//! The coordinator's entry point: open the data dir, serve every gRPC service over TLS (client
//! certificates optional, verified against the federation CA), expire worker leases, and stop
//! gracefully when `shutdown` resolves.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use sovra_proto::pb;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::{error, info};

use crate::datadir::DataDir;
use crate::error::CoordinatorError;
use crate::federation::{Federation, FederationConfig};
use crate::service::ControlPlane;
use crate::store::SledStore;

/// Settings of a coordinator process.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Folder of the CA, the operator token and the database.
    pub data_dir: PathBuf,
    /// Federation settings.
    pub federation: FederationConfig,
}

/// Opens the federation in `config.data_dir`.
pub fn open(config: &CoordinatorConfig) -> Result<Arc<Federation>, CoordinatorError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        CoordinatorError::Io(format!("creating {}: {e}", config.data_dir.display()))
    })?;
    let dir = DataDir {
        root: config.data_dir.clone(),
    };
    let store = SledStore::open(&dir.db())?;
    Ok(Arc::new(Federation::open(
        &dir,
        Arc::new(store),
        config.federation.clone(),
    )?))
}

/// Serves `fed` on `listener` until `shutdown` resolves.
pub async fn run(
    fed: Arc<Federation>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let (chain, key) = fed
        .ca()
        .issue_server_cert(&fed.config().advertise)
        .map_err(|e| CoordinatorError::Internal(e.to_string()))?;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(chain, key))
        .client_ca_root(Certificate::from_pem(fed.ca().cert_pem()))
        .client_auth_optional(true);
    let plane = ControlPlane::new(fed.clone());
    let reaper = tokio::spawn(expire_leases(fed.clone()));
    let recoveries = tokio::spawn(fed.clone().run_recoveries());
    info!(addr = ?listener.local_addr().ok(), "coordinator serving");
    let result = Server::builder()
        .tls_config(tls)
        .map_err(|e| CoordinatorError::Internal(format!("TLS setup: {e}")))?
        .add_service(pb::coordinator_server::CoordinatorServer::new(
            plane.clone(),
        ))
        .add_service(pb::providers_server::ProvidersServer::new(plane.clone()))
        .add_service(pb::tenants_server::TenantsServer::new(plane.clone()))
        .add_service(pb::workers_server::WorkersServer::new(plane.clone()))
        .add_service(pb::models_server::ModelsServer::new(plane.clone()))
        .add_service(pb::placements_server::PlacementsServer::new(plane.clone()))
        .add_service(pb::jobs_server::JobsServer::new(plane))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), {
            let fed = fed.clone();
            async move {
                shutdown.await;
                // The server waits for every call in flight: end the streams that never end
                // by themselves (agent streams, running jobs).
                fed.shut_down();
            }
        })
        .await;
    reaper.abort();
    recoveries.abort();
    fed.store().flush()?;
    result.map_err(|e| CoordinatorError::Internal(format!("server: {e}")))
}

async fn expire_leases(fed: Arc<Federation>) {
    let period = (fed.config().lease / 4).max(std::time::Duration::from_millis(50));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let now = std::time::Instant::now();
        if let Err(e) = fed.expire_leases(now) {
            error!(cause = %e, "expiring leases");
        }
        fed.check_stalled_jobs(now, fed.config().job_stall);
        fed.replan_degraded().await;
    }
}
