//! Connecting to agentd: `unix:PATH` or `http(s)://ADDR` (with a bearer token), for the
//! `grove` CLI, tests and grove-bench.

use std::path::PathBuf;

use grove_proto::v1 as pb;
use hyper_util::rt::TokioIo;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

/// The default endpoint.
pub const DEFAULT_ENDPOINT: &str = "unix:/run/grove/agentd.sock";

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there: agentd is not running.
    #[error("agentd is not running (nothing answers at {0})")]
    NotRunning(String),
    /// The endpoint string is malformed.
    #[error("bad endpoint {0:?}: expected unix:PATH or http(s)://HOST:PORT")]
    BadEndpoint(String),
    /// The token is not valid header text.
    #[error("bad token")]
    BadToken,
    /// Transport failure.
    #[error("connect to {endpoint}")]
    Transport {
        /// The endpoint.
        endpoint: String,
        /// The cause.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Adds `authorization: Bearer TOKEN` to every request.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel with the token interceptor.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// Clients of the three services over one connection.
#[derive(Clone)]
pub struct Clients {
    /// SandboxService.
    pub sandbox: pb::sandbox_service_client::SandboxServiceClient<AuthChannel>,
    /// TemplateService.
    pub template: pb::template_service_client::TemplateServiceClient<AuthChannel>,
    /// NodeService.
    pub node: pb::node_service_client::NodeServiceClient<AuthChannel>,
    /// ProcessService.
    pub process: pb::process_service_client::ProcessServiceClient<AuthChannel>,
    /// FilesystemService.
    pub files: pb::filesystem_service_client::FilesystemServiceClient<AuthChannel>,
    /// The raw channel (health, reflection).
    pub channel: Channel,
}

/// Connects a channel to `endpoint`.
pub async fn channel(endpoint: &str) -> Result<Channel, ClientError> {
    if let Some(path) = endpoint.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if path.as_os_str().is_empty() {
            return Err(ClientError::BadEndpoint(endpoint.into()));
        }
        if !path.exists() {
            return Err(ClientError::NotRunning(endpoint.into()));
        }
        let p = path.clone();
        let ch = Endpoint::try_from("http://agentd.local")
            .map_err(|_| ClientError::BadEndpoint(endpoint.into()))?
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let p = p.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
                }
            }))
            .await
            .map_err(|source| classify(endpoint, source))?;
        return Ok(ch);
    }
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        let ep = Endpoint::from_shared(endpoint.to_string())
            .map_err(|_| ClientError::BadEndpoint(endpoint.into()))?;
        #[cfg(feature = "tls")]
        let ep = if endpoint.starts_with("https://") {
            ep.tls_config(tonic::transport::ClientTlsConfig::new().with_enabled_roots())
                .map_err(|source| ClientError::Transport { endpoint: endpoint.into(), source })?
        } else {
            ep
        };
        return ep.connect().await.map_err(|source| classify(endpoint, source));
    }
    Err(ClientError::BadEndpoint(endpoint.into()))
}

fn classify(endpoint: &str, source: tonic::transport::Error) -> ClientError {
    let refused = std::error::Error::source(&source)
        .and_then(|s| {
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(s);
            while let Some(e) = cur {
                if let Some(io) = e.downcast_ref::<std::io::Error>() {
                    return Some(io.kind());
                }
                cur = e.source();
            }
            None
        })
        .is_some_and(|k| {
            matches!(k, std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound)
        });
    if refused {
        ClientError::NotRunning(endpoint.into())
    } else {
        ClientError::Transport { endpoint: endpoint.into(), source }
    }
}

/// Connects the three clients to `endpoint`, sending `token` as a bearer token if given.
pub async fn connect(endpoint: &str, token: Option<&str>) -> Result<Clients, ClientError> {
    let ch = channel(endpoint).await?;
    let bearer = match token {
        Some(t) => Bearer(Some(format!("Bearer {t}").parse().map_err(|_| ClientError::BadToken)?)),
        None => Bearer(None),
    };
    Ok(Clients {
        sandbox: pb::sandbox_service_client::SandboxServiceClient::with_interceptor(
            ch.clone(),
            bearer.clone(),
        ),
        template: pb::template_service_client::TemplateServiceClient::with_interceptor(
            ch.clone(),
            bearer.clone(),
        ),
        process: pb::process_service_client::ProcessServiceClient::with_interceptor(
            ch.clone(),
            bearer.clone(),
        ),
        files: pb::filesystem_service_client::FilesystemServiceClient::with_interceptor(
            ch.clone(),
            bearer.clone(),
        ),
        node: pb::node_service_client::NodeServiceClient::with_interceptor(ch.clone(), bearer),
        channel: ch,
    })
}
