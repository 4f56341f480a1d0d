//! The gRPC server: grove.v1's three services over the [`Node`], grpc.health.v1, server
//! reflection (v1 and v1alpha, so grpcurl works without the proto files), bearer-token
//! authentication on TCP, per-request tracing spans and metrics, and the Prometheus HTTP
//! endpoint.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use grove_proto::v1 as pb;
use pb::filesystem_service_server::{FilesystemService, FilesystemServiceServer};
use pb::node_service_server::{NodeService, NodeServiceServer};
use pb::process_service_server::{ProcessService, ProcessServiceServer};
use pb::sandbox_service_server::{SandboxService, SandboxServiceServer};
use pb::template_service_server::{TemplateService, TemplateServiceServer};
use tokio_stream::wrappers::{BroadcastStream, UnboundedReceiverStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::config::{Config, Listen};
use crate::error::AgentError;
use crate::files;
use crate::node::Node;

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The services, over one node.
#[derive(Clone)]
pub struct Api {
    node: Arc<Node>,
}

impl Api {
    async fn run<T, F>(&self, method: &'static str, f: F) -> Result<Response<T>, Status>
    where
        F: std::future::Future<Output = Result<T, AgentError>>,
    {
        let span = tracing::info_span!("rpc", method);
        let t = Instant::now();
        let r = f.instrument(span.clone()).await;
        let _g = span.enter();
        match r {
            Ok(v) => {
                self.node.metrics.request(method, None);
                tracing::debug!(ms = t.elapsed().as_secs_f64() * 1000.0, "ok");
                Ok(Response::new(v))
            }
            Err(e) => {
                let s: Status = e.into();
                self.node.metrics.request(method, Some(s.code()));
                tracing::info!(code = ?s.code(), error = %s.message(), "refused");
                Err(s)
            }
        }
    }
}

#[tonic::async_trait]
impl SandboxService for Api {
    async fn create(&self, r: Request<pb::CreateRequest>) -> Result<Response<pb::Sandbox>, Status> {
        self.run("Create", self.node.create(r.into_inner())).await
    }

    async fn get(&self, r: Request<pb::GetRequest>) -> Result<Response<pb::Sandbox>, Status> {
        self.run("Get", async { self.node.get(&r.into_inner().id) }).await
    }

    async fn list(
        &self,
        r: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        self.run("List", async { self.node.list(&r.into_inner()) }).await
    }

    async fn delete(
        &self,
        r: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = r.into_inner();
        self.run("Delete", async {
            let deleted = self.node.delete_tree(&r.id, r.subtree).await?;
            Ok(pb::DeleteResponse { deleted })
        })
        .await
    }

    async fn keep(
        &self,
        r: Request<pb::KeepRequest>,
    ) -> Result<Response<pb::KeepResponse>, Status> {
        let id = r.into_inner().id;
        self.run("Keep", async { Ok(pb::KeepResponse { deleted: self.node.keep(&id).await? }) })
            .await
    }

    async fn set_ttl(
        &self,
        r: Request<pb::SetTtlRequest>,
    ) -> Result<Response<pb::SetTtlResponse>, Status> {
        let r = r.into_inner();
        self.run("SetTtl", async {
            Ok(pb::SetTtlResponse { sandboxes: self.node.set_ttl(&r).await? })
        })
        .await
    }

    async fn rewind(&self, r: Request<pb::RewindRequest>) -> Result<Response<pb::Sandbox>, Status> {
        let r = r.into_inner();
        self.run("Rewind", self.node.rewind(&r)).await
    }

    async fn pause(&self, r: Request<pb::PauseRequest>) -> Result<Response<pb::Sandbox>, Status> {
        self.run("Pause", self.node.set_paused(&r.into_inner().id, true)).await
    }

    async fn resume(&self, r: Request<pb::ResumeRequest>) -> Result<Response<pb::Sandbox>, Status> {
        self.run("Resume", self.node.set_paused(&r.into_inner().id, false)).await
    }

    async fn snapshot(
        &self,
        r: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotInfo>, Status> {
        self.run("Snapshot", self.node.snapshot(r.into_inner())).await
    }

    async fn fork(
        &self,
        r: Request<pb::ForkRequest>,
    ) -> Result<Response<pb::ForkResponse>, Status> {
        self.run("Fork", self.node.fork(r.into_inner())).await
    }

    type ForkRunStream = Stream_<pb::ForkRunEvent>;

    async fn fork_run(
        &self,
        r: Request<pb::ForkRunRequest>,
    ) -> Result<Response<Self::ForkRunStream>, Status> {
        let node = self.node.clone();
        self.run("ForkRun", async move {
            let rx = node.fork_run(r.into_inner()).await?;
            Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as Self::ForkRunStream)
        })
        .await
    }

    type WatchStream = Stream_<pb::Event>;

    async fn watch(
        &self,
        r: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = r.into_inner();
        let node = self.node.clone();
        self.run("Watch", async move {
            let id = if req.id.is_empty() { None } else { Some(req.id.clone()) };
            // Subscribe first, then list: no event falls between the two.
            let rx = node.subscribe();
            if let Some(i) = &id {
                node.exists(i)?;
            }
            let current =
                if req.include_current { node.current_events(id.as_deref()) } else { Vec::new() };
            let live = BroadcastStream::new(rx).filter_map(move |ev| match ev {
                Ok(e) => {
                    let keep =
                        id.as_ref().is_none_or(|i| e.sandbox.as_ref().is_some_and(|s| &s.id == i));
                    keep.then_some(Ok(e))
                }
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    Some(Err(Status::data_loss(format!(
                        "watch fell behind: {n} events dropped; watch again"
                    ))))
                }
            });
            let s: Self::WatchStream =
                Box::pin(tokio_stream::iter(current.into_iter().map(Ok)).chain(live));
            Ok(s)
        })
        .await
    }

    async fn list_snapshots(
        &self,
        _r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        self.run("ListSnapshots", async {
            self.node.list_snapshots().map(|snapshots| pb::ListSnapshotsResponse { snapshots })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        self.run("DeleteSnapshot", async {
            self.node.delete_snapshot(r.into_inner().id).map(|()| pb::DeleteSnapshotResponse {})
        })
        .await
    }
}

#[tonic::async_trait]
impl TemplateService for Api {
    async fn register(
        &self,
        r: Request<pb::RegisterTemplateRequest>,
    ) -> Result<Response<pb::Template>, Status> {
        self.run("RegisterTemplate", self.node.register_template(r.into_inner())).await
    }

    async fn list(
        &self,
        _r: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        self.run("ListTemplates", async {
            self.node.list_templates().map(|templates| pb::ListTemplatesResponse { templates })
        })
        .await
    }

    async fn delete(
        &self,
        r: Request<pb::DeleteTemplateRequest>,
    ) -> Result<Response<pb::DeleteTemplateResponse>, Status> {
        let name = r.into_inner().name;
        self.run("DeleteTemplate", async {
            self.node.delete_template(&name).await.map(|()| pb::DeleteTemplateResponse {})
        })
        .await
    }

    type WarmStream = Stream_<pb::WarmProgress>;

    async fn warm(
        &self,
        r: Request<pb::WarmRequest>,
    ) -> Result<Response<Self::WarmStream>, Status> {
        let name = r.into_inner().name;
        crate::validate::name("template", &name).map_err(Status::from)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<pb::WarmProgress>();
        let (etx, erx) = tokio::sync::mpsc::unbounded_channel::<Result<pb::WarmProgress, Status>>();
        let node = self.node.clone();
        let metrics = self.node.metrics.clone();
        tokio::spawn(
            async move {
                let r = node.warm(&name, tx).await;
                metrics.request("WarmTemplate", r.as_ref().err().map(AgentError::code));
                if let Err(e) = r {
                    tracing::info!(error = %e.one_line(), "warm failed");
                    let _ = etx.send(Err(e.into()));
                }
            }
            .instrument(tracing::info_span!("rpc", method = "WarmTemplate")),
        );
        let progress = UnboundedReceiverStream::new(rx).map(Ok);
        let s: Self::WarmStream = Box::pin(progress.chain(UnboundedReceiverStream::new(erx)));
        Ok(Response::new(s))
    }
}

#[tonic::async_trait]
impl ProcessService for Api {
    type StartStream = Stream_<pb::ProcessEvent>;

    async fn start(
        &self,
        r: Request<pb::StartProcessRequest>,
    ) -> Result<Response<Self::StartStream>, Status> {
        let req = r.into_inner();
        let node = self.node.clone();
        self.run("ProcessStart", async move {
            let (_, rx) = node.start_process(&req).await?;
            Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as Self::StartStream)
        })
        .await
    }

    async fn send_stdin(
        &self,
        r: Request<pb::SendStdinRequest>,
    ) -> Result<Response<pb::SendStdinResponse>, Status> {
        let r = r.into_inner();
        self.run("ProcessSendStdin", async {
            self.node.procs.stdin(&r.process_id, &r.data, r.eof)?;
            Ok(pb::SendStdinResponse {})
        })
        .await
    }

    async fn signal(
        &self,
        r: Request<pb::SignalProcessRequest>,
    ) -> Result<Response<pb::SignalProcessResponse>, Status> {
        let r = r.into_inner();
        self.run("ProcessSignal", async {
            self.node.procs.signal(&r.process_id, r.signal)?;
            Ok(pb::SignalProcessResponse {})
        })
        .await
    }

    async fn resize(
        &self,
        r: Request<pb::ResizeProcessRequest>,
    ) -> Result<Response<pb::ResizeProcessResponse>, Status> {
        let r = r.into_inner();
        self.run("ProcessResize", async {
            self.node.procs.resize(&r.process_id, r.rows, r.cols)?;
            Ok(pb::ResizeProcessResponse {})
        })
        .await
    }

    type ConnectStream = Stream_<pb::ProcessEvent>;

    async fn connect(
        &self,
        r: Request<pb::ConnectProcessRequest>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let r = r.into_inner();
        self.run("ProcessConnect", async {
            let rx = self.node.procs.connect(&r.process_id, r.from_seq)?;
            Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as Self::ConnectStream)
        })
        .await
    }

    async fn wait(
        &self,
        r: Request<pb::WaitProcessRequest>,
    ) -> Result<Response<pb::ProcessExit>, Status> {
        let r = r.into_inner();
        self.run("ProcessWait", self.node.procs.wait(&r.process_id)).await
    }

    async fn list(
        &self,
        r: Request<pb::ListProcessesRequest>,
    ) -> Result<Response<pb::ListProcessesResponse>, Status> {
        let r = r.into_inner();
        self.run("ProcessList", async {
            Ok(pb::ListProcessesResponse { processes: self.node.list_processes(&r.sandbox_id)? })
        })
        .await
    }
}

#[tonic::async_trait]
impl FilesystemService for Api {
    async fn stat(
        &self,
        r: Request<pb::StatFileRequest>,
    ) -> Result<Response<pb::FileInfo>, Status> {
        let r = r.into_inner();
        self.run("FileStat", async {
            files::check_path(&r.path)?;
            let vsock = self.node.agent_vsock(&r.sandbox_id)?;
            let path = r.path.clone();
            let i = files::unary(vsock, "stat", move |c| c.stat(&path)).await?;
            Ok(files::info_pb(&i, r.path))
        })
        .await
    }

    type ReadStream = Stream_<pb::FileChunk>;

    async fn read(
        &self,
        r: Request<pb::ReadFileRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let r = r.into_inner();
        self.run("FileRead", async {
            files::check_path(&r.path)?;
            let vsock = self.node.agent_vsock(&r.sandbox_id)?;
            let slot = self.node.file_streams.take()?;
            let req = grove_proto::guest::FileRead {
                path: r.path,
                offset: r.offset,
                length: r.length,
                ..Default::default()
            };
            let rx = files::read(vsock, req, slot);
            Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as Self::ReadStream)
        })
        .await
    }

    async fn write(
        &self,
        r: Request<tonic::Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        let mut stream = r.into_inner();
        self.run("FileWrite", async {
            let first = stream
                .message()
                .await
                .map_err(|s| AgentError::InvalidArgument(format!("write stream: {s}")))?
                .ok_or_else(|| AgentError::InvalidArgument("an empty write stream".into()))?;
            files::check_path(&first.path)?;
            if first.mode > 0o7777 {
                return Err(AgentError::InvalidArgument(format!("mode {:o}", first.mode)));
            }
            if first.data.len() > files::MAX_WRITE_MESSAGE {
                return Err(AgentError::InvalidArgument(format!(
                    "a Write message carries at most {} bytes",
                    files::MAX_WRITE_MESSAGE
                )));
            }
            let vsock = self.node.agent_vsock(&first.sandbox_id)?;
            let slot = self.node.file_streams.take()?;
            let open = grove_proto::guest::FileWriteOpen {
                path: first.path,
                mode: first.mode,
                append: first.append,
                mkdir_parents: first.make_parents,
                ..Default::default()
            };
            let bytes = files::write(vsock, open, first.data, stream, slot).await?;
            Ok(pb::WriteFileResponse { bytes })
        })
        .await
    }

    async fn list(
        &self,
        r: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        let r = r.into_inner();
        self.run("FileList", async {
            files::check_path(&r.path)?;
            if r.depth > files::MAX_DEPTH {
                return Err(AgentError::InvalidArgument(format!(
                    "depth {} (at most {})",
                    r.depth,
                    files::MAX_DEPTH
                )));
            }
            let vsock = self.node.agent_vsock(&r.sandbox_id)?;
            let (path, depth) = (r.path, r.depth);
            let entries = tokio::task::spawn_blocking(move || {
                let mut c = files::connect(&vsock)?;
                files::list(&mut c, &path, depth)
            })
            .await
            .map_err(|e| AgentError::Internal(format!("list: {e}")))??;
            Ok(pb::ListFilesResponse { entries })
        })
        .await
    }

    async fn make_dir(
        &self,
        r: Request<pb::MakeDirRequest>,
    ) -> Result<Response<pb::MakeDirResponse>, Status> {
        let r = r.into_inner();
        self.run("FileMakeDir", async {
            files::check_path(&r.path)?;
            let vsock = self.node.agent_vsock(&r.sandbox_id)?;
            files::unary(vsock, "mkdir", move |c| c.mkdir(&r.path, r.parents)).await?;
            Ok(pb::MakeDirResponse {})
        })
        .await
    }

    async fn remove(
        &self,
        r: Request<pb::RemoveFileRequest>,
    ) -> Result<Response<pb::RemoveFileResponse>, Status> {
        let r = r.into_inner();
        self.run("FileRemove", async {
            files::check_path(&r.path)?;
            let vsock = self.node.agent_vsock(&r.sandbox_id)?;
            files::unary(vsock, "remove", move |c| c.remove(&r.path, r.recursive)).await?;
            Ok(pb::RemoveFileResponse {})
        })
        .await
    }

    async fn rename(
        &self,
        r: Request<pb::RenameFileRequest>,
    ) -> Result<Response<pb::RenameFileResponse>, Status> {
        let r = r.into_inner();
        self.run("FileRename", async {
            files::check_path(&r.from)?;
            files::check_path(&r.to)?;
            let vsock = self.node.agent_vsock(&r.sandbox_id)?;
            files::unary(vsock, "rename", move |c| c.rename(&r.from, &r.to)).await?;
            Ok(pb::RenameFileResponse {})
        })
        .await
    }

    type WatchStream = Stream_<pb::FileEvent>;

    async fn watch(
        &self,
        r: Request<pb::WatchDirRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = r.into_inner();
        self.run("FileWatch", async {
            files::check_path(&r.path)?;
            let vsock = self.node.agent_vsock(&r.sandbox_id)?;
            let slot = self.node.file_watches.take()?;
            let rx = files::watch(vsock, r.path, slot).await?;
            Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as Self::WatchStream)
        })
        .await
    }
}

#[tonic::async_trait]
impl NodeService for Api {
    async fn info(&self, _r: Request<pb::InfoRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        self.run("Info", async { Ok(self.node.info()) }).await
    }

    async fn metrics(
        &self,
        _r: Request<pb::MetricsRequest>,
    ) -> Result<Response<pb::MetricsResponse>, Status> {
        self.run("Metrics", async { Ok(pb::MetricsResponse { text: self.node.metrics_text() }) })
            .await
    }
}

/// Checks the bearer token on TCP listeners (constant-time comparison); Unix listeners
/// rely on the socket's file permissions.
#[derive(Clone)]
pub struct Auth(Option<Arc<str>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(want) = &self.0 else { return Ok(req) };
        let got = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let (a, b) = (got.as_bytes(), want.as_bytes());
        let diff = a.iter().zip(b).fold(a.len() ^ b.len(), |d, (x, y)| d | usize::from(x ^ y));
        if diff == 0 {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong bearer token"))
        }
    }
}

/// Server errors (start-up).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address cannot be used.
    #[error("listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another agentd serves the socket.
    #[error("{0} is served by another agentd")]
    InUse(String),
    /// tonic.
    #[error("gRPC server")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection descriptors.
    #[error("reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves the node on `cfg.listen` until `shutdown` resolves.
pub async fn serve(
    node: Arc<Node>,
    cfg: &Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let api = Api { node: node.clone() };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<SandboxServiceServer<Api>>().await;
    reporter.set_serving::<TemplateServiceServer<Api>>().await;
    reporter.set_serving::<NodeServiceServer<Api>>().await;
    reporter.set_serving::<ProcessServiceServer<Api>>().await;
    reporter.set_serving::<FilesystemServiceServer<Api>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let auth = Auth(cfg.token.as_deref().map(Arc::from));
    #[allow(unused_mut)]
    let mut builder = tonic::transport::Server::builder();
    #[cfg(feature = "tls")]
    if let Some((cert, key)) = &cfg.tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p)
                .map_err(|source| ServerError::Listen { addr: p.display().to_string(), source })
        };
        let id = tonic::transport::Identity::from_pem(read(cert)?, read(key)?);
        builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(id))?;
    }
    let router = builder
        .add_service(health)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection_v1,
            auth.clone(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            reflection_v1alpha,
            auth.clone(),
        ))
        .add_service(SandboxServiceServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(TemplateServiceServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(ProcessServiceServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(FilesystemServiceServer::with_interceptor(api.clone(), auth.clone()))
        .add_service(NodeServiceServer::with_interceptor(api, auth));
    match &cfg.listen {
        Listen::Unix(path) => {
            let l = bind_unix(path).await?;
            tracing::info!(socket = %path.display(), "serving gRPC");
            let r = router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(l),
                    shutdown,
                )
                .await;
            let _ = std::fs::remove_file(path);
            r?;
        }
        Listen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Listen { addr: addr.clone(), source })?;
            tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), tls = cfg.tls.is_some(), "serving gRPC");
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(l),
                    shutdown,
                )
                .await?;
        }
    }
    Ok(())
}

/// Binds the Unix socket, replacing a stale one (nothing answers on it) but never one a
/// running agentd serves.
async fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener, ServerError> {
    let err = |source| ServerError::Listen { addr: format!("unix:{}", path.display()), source };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(err)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServerError::InUse(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let l = tokio::net::UnixListener::bind(path).map_err(err)?;
    // Owner and group only: the socket is the API's access control on this host.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(l)
}

/// Serves `/metrics` (Prometheus text) on `addr` until the process ends; returns the bound
/// address.
pub async fn serve_metrics(
    node: Arc<Node>,
    addr: &str,
) -> Result<std::net::SocketAddr, ServerError> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen { addr: addr.to_string(), source })?;
    let bound =
        l.local_addr().map_err(|source| ServerError::Listen { addr: addr.to_string(), source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let node = node.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    node.metrics_text(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(l, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics");
    Ok(bound)
}
