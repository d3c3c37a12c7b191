//! The agent API on vsock: each ttrpc call goes to the [`Sandbox`], and each
//! failure comes back as a status with a code and a message. A bad request
//! never ends the agent: it is PID 1, and its exit is the VM's. Each call
//! about a container runs in a `request` span carrying its container (and
//! exec) id, so every log line it leads to names them.

use std::sync::Arc;

use async_trait::async_trait;
use podvisor_protocol::{api, API_VERSION};
use tokio_vsock::{VsockAddr, VsockListener};
use ttrpc::r#async::TtrpcContext;

use crate::error::AgentError;
use crate::sandbox::Sandbox;

type Rpc<T> = ttrpc::Result<T>;

pub struct Service {
    sandbox: Arc<Sandbox>,
}

/// Serves the agent API on vsock `port` until the process ends.
pub async fn serve(sandbox: Arc<Sandbox>, port: u32) -> anyhow::Result<()> {
    let listener = VsockListener::bind(VsockAddr::new(libc::VMADDR_CID_ANY, port))
        .map_err(|e| anyhow::anyhow!("binding vsock port {port}: {e}"))?;
    let service = Arc::new(Service { sandbox });
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(listener.into())
        .register_service(api::create_agent(service));
    server.start().await?;
    tracing::info!("agent API serving on vsock port {port}");
    if crate::warm::is_template() {
        // No vsock device until a clone's is hot-plugged.
        crate::warm::announce_ready();
        tokio::spawn(crate::warm::report_ready_once_plugged());
    } else {
        tokio::spawn(report_ready());
    }
    std::future::pending::<()>().await;
    Ok(())
}

/// Tells the host the API serves: a connection to host port READY_PORT.
/// Without a listener there (a host that dials blindly) it is refused;
/// that is fine.
pub async fn report_ready() {
    let addr = VsockAddr::new(libc::VMADDR_CID_HOST, podvisor_protocol::READY_PORT);
    match tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio_vsock::VsockStream::connect(addr),
    )
    .await
    {
        Ok(Ok(_)) => tracing::debug!("reported ready to the host"),
        Ok(Err(e)) => tracing::debug!("reporting ready: {e}"),
        Err(_) => tracing::debug!("reporting ready: no answer"),
    }
}

fn log_err<T>(call: &str, r: Result<T, AgentError>) -> Rpc<T> {
    r.map_err(|e| {
        tracing::warn!("{call}: {e}");
        e.into()
    })
}

#[async_trait]
impl api::Agent for Service {
    async fn check(&self, _: &TtrpcContext, _: api::CheckRequest) -> Rpc<api::CheckResponse> {
        Ok(api::CheckResponse {
            serving: true,
            ..Default::default()
        })
    }

    async fn version(&self, _: &TtrpcContext, _: api::VersionRequest) -> Rpc<api::VersionResponse> {
        Ok(api::VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: API_VERSION,
            ..Default::default()
        })
    }

    async fn get_guest_details(
        &self,
        _: &TtrpcContext,
        _: api::GuestDetailsRequest,
    ) -> Rpc<api::GuestDetailsResponse> {
        Ok(self.sandbox.guest_details())
    }

    #[tracing::instrument(name = "request", skip_all, fields(sandbox = %req.sandbox_id))]
    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: api::CreateSandboxRequest,
    ) -> Rpc<api::Empty> {
        log_err("CreateSandbox", self.sandbox.create_sandbox(&req).await)
            .map(|()| api::Empty::new())
    }

    async fn destroy_sandbox(
        &self,
        _: &TtrpcContext,
        _: api::DestroySandboxRequest,
    ) -> Rpc<api::Empty> {
        tracing::info!("DestroySandbox: stopping every container and powering off");
        self.sandbox.destroy();
        Ok(api::Empty::new())
    }

    async fn configure_network(
        &self,
        _: &TtrpcContext,
        req: api::ConfigureNetworkRequest,
    ) -> Rpc<api::ConfigureNetworkResponse> {
        let configured = if crate::warm::is_template() {
            // A clone's NICs are hot-plugged as it resumes.
            crate::warm::retry(
                "waiting for the hot-plugged NICs",
                |e| matches!(e, AgentError::NotFound(_)),
                || crate::network::configure(&req),
            )
            .await
        } else {
            crate::network::configure(&req)
        };
        log_err("ConfigureNetwork", configured).map(|names| {
            let mut r = api::ConfigureNetworkResponse::new();
            r.interfaces = names;
            r
        })
    }

    #[tracing::instrument(name = "request", skip_all, fields(container = %req.container_id))]
    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: api::CreateContainerRequest,
    ) -> Rpc<api::CreateContainerResponse> {
        let ports = log_err("CreateContainer", self.sandbox.create_container(&req).await)?;
        Ok(api::CreateContainerResponse {
            ports: Some(ports).into(),
            ..Default::default()
        })
    }

    #[tracing::instrument(name = "request", skip_all, fields(container = %req.container_id, exec = %req.exec_id))]
    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: api::StartContainerRequest,
    ) -> Rpc<api::Empty> {
        log_err(
            "StartContainer",
            self.sandbox.start(&req.container_id, &req.exec_id).await,
        )
        .map(|()| api::Empty::new())
    }

    #[tracing::instrument(name = "request", skip_all, fields(container = %req.container_id, exec = %req.exec_id))]
    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> Rpc<api::ExecProcessResponse> {
        log_err("ExecProcess", self.sandbox.exec(&req).await)
    }

    #[tracing::instrument(name = "request", skip_all, fields(container = %req.container_id, exec = %req.exec_id))]
    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: api::SignalProcessRequest,
    ) -> Rpc<api::Empty> {
        log_err("SignalProcess", self.sandbox.signal(&req)).map(|()| api::Empty::new())
    }

    #[tracing::instrument(name = "request", skip_all, fields(container = %req.container_id, exec = %req.exec_id))]
    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: api::WaitProcessRequest,
    ) -> Rpc<api::WaitProcessResponse> {
        log_err(
            "WaitProcess",
            self.sandbox.wait(&req.container_id, &req.exec_id).await,
        )
    }

    #[tracing::instrument(name = "request", skip_all, fields(container = %req.container_id, exec = %req.exec_id))]
    async fn close_stdin(&self, _: &TtrpcContext, req: api::CloseStdinRequest) -> Rpc<api::Empty> {
        log_err(
            "CloseStdin",
            self.sandbox.close_stdin(&req.container_id, &req.exec_id),
        )
        .map(|()| api::Empty::new())
    }

    #[tracing::instrument(name = "request", skip_all, fields(container = %req.container_id, exec = %req.exec_id))]
    async fn tty_win_resize(
        &self,
        _: &TtrpcContext,
        req: api::TtyWinResizeRequest,
    ) -> Rpc<api::Empty> {
        log_err("TtyWinResize", self.sandbox.resize(&req)).map(|()| api::Empty::new())
    }

    #[tracing::instrument(name = "request", skip_all, fields(container = %req.container_id))]
    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: api::ListProcessesRequest,
    ) -> Rpc<api::ListProcessesResponse> {
        let pids = log_err("ListProcesses", self.sandbox.pids(&req.container_id))?;
        Ok(api::ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    #[tracing::instrument(name = "request", skip_all, fields(container = %req.container_id))]
    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: api::StatsContainerRequest,
    ) -> Rpc<api::StatsContainerResponse> {
        log_err("StatsContainer", self.sandbox.stats(&req.container_id))
    }

    #[tracing::instrument(name = "request", skip_all, fields(container = %req.container_id))]
    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: api::UpdateContainerRequest,
    ) -> Rpc<api::Empty> {
        log_err(
            "UpdateContainer",
            self.sandbox.update(&req.container_id, &req.resources_json),
        )
        .map(|()| api::Empty::new())
    }

    #[tracing::instrument(name = "request", skip_all, fields(container = %req.container_id, exec = %req.exec_id))]
    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: api::RemoveContainerRequest,
    ) -> Rpc<api::Empty> {
        log_err(
            "RemoveContainer",
            self.sandbox.remove(&req.container_id, &req.exec_id),
        )
        .map(|()| api::Empty::new())
    }
}
