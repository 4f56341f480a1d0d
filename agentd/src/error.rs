//! agentd's errors and the one place where they become gRPC status codes.

use grove_storage::block::BlockError;
use grove_storage::catalog::CatalogError;
use grove_vmm_api::{ClientError, ErrorCode};

/// What an agentd operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A malformed request: a bad name, label, count or path.
    #[error("{0}")]
    InvalidArgument(String),
    /// Something the request names does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// What the request would create exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request does not fit the current state (a paused sandbox forked, a template in
    /// use deleted, a template not warmed).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The host cannot hold it (memory, vCPUs, sandboxes): nothing was changed.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A field reserved for a later version.
    #[error("{0}")]
    Unimplemented(String),
    /// agentd is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// A VMM refused or failed a request.
    #[error("VMM {what}")]
    Vmm {
        /// What was asked.
        what: String,
        /// The VMM's error.
        #[source]
        source: ClientError,
    },
    /// A guest's agent refused or failed a request (or could not be reached).
    #[error("guest agent: {what}")]
    Guest {
        /// What was asked.
        what: String,
        /// The guest client's error.
        #[source]
        source: grove_proto::client::ClientError,
    },
    /// The catalog failed.
    #[error("catalog")]
    Catalog(#[from] CatalogError),
    /// The block store failed.
    #[error("block store")]
    Block(#[from] BlockError),
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Anything else that is agentd's own fault.
    #[error("{0}")]
    Internal(String),
}

impl AgentError {
    /// An I/O error on `path`.
    pub fn io(op: &'static str, path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        AgentError::Io { op, path: path.as_ref().display().to_string(), source }
    }

    /// A guest agent client error for `what`.
    pub fn guest(what: impl Into<String>, source: grove_proto::client::ClientError) -> Self {
        AgentError::Guest { what: what.into(), source }
    }

    /// A VMM client error for `what`.
    pub fn vmm(what: impl Into<String>, source: ClientError) -> Self {
        AgentError::Vmm { what: what.into(), source }
    }

    /// The gRPC code for this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            AgentError::InvalidArgument(_) => Code::InvalidArgument,
            AgentError::NotFound(_) => Code::NotFound,
            AgentError::AlreadyExists(_) => Code::AlreadyExists,
            AgentError::FailedPrecondition(_) => Code::FailedPrecondition,
            AgentError::ResourceExhausted(_) => Code::ResourceExhausted,
            AgentError::Unimplemented(_) => Code::Unimplemented,
            AgentError::Unavailable(_) => Code::Unavailable,
            AgentError::Vmm { source, .. } => match source.code() {
                Some(ErrorCode::InvalidArgument | ErrorCode::BadRequest) => Code::InvalidArgument,
                Some(ErrorCode::NotFound) => Code::NotFound,
                Some(ErrorCode::AlreadyExists) => Code::AlreadyExists,
                Some(ErrorCode::FailedPrecondition | ErrorCode::Incompatible) => {
                    Code::FailedPrecondition
                }
                Some(ErrorCode::ResourceExhausted) => Code::ResourceExhausted,
                Some(ErrorCode::Unavailable) => Code::Unavailable,
                Some(ErrorCode::Corrupt) => Code::DataLoss,
                Some(ErrorCode::Internal) | None => Code::Internal,
            },
            AgentError::Guest { source, .. } => {
                use grove_proto::client::ClientError as G;
                use grove_proto::guest::ErrorCode as E;
                match source {
                    G::Guest { code, .. } => match code {
                        E::NotFound => Code::NotFound,
                        E::PermissionDenied | E::OutsideRoot => Code::PermissionDenied,
                        E::AlreadyExists => Code::AlreadyExists,
                        E::BadRequest | E::NotADirectory | E::IsADirectory => Code::InvalidArgument,
                        E::Limit => Code::ResourceExhausted,
                        // ENOSPC, EDQUOT: the guest's file system is full.
                        E::Io if matches!(source, G::Guest { errno: 28 | 122, .. }) => {
                            Code::ResourceExhausted
                        }
                        E::SpawnFailed | E::Unsupported => Code::FailedPrecondition,
                        _ => Code::Internal,
                    },
                    G::Gone(_) | G::Deadline { .. } | G::Timeout => Code::Unavailable,
                    _ => Code::Internal,
                }
            }
            AgentError::Catalog(CatalogError::NotFound(_)) => Code::NotFound,
            AgentError::Catalog(CatalogError::Exists(_)) => Code::AlreadyExists,
            AgentError::Catalog(CatalogError::InUse(_)) => Code::FailedPrecondition,
            AgentError::Catalog(CatalogError::IdsExhausted) => Code::ResourceExhausted,
            AgentError::Block(BlockError::NoSpace(_)) => Code::ResourceExhausted,
            AgentError::Block(BlockError::Invalid(_)) => Code::InvalidArgument,
            AgentError::Catalog(_) | AgentError::Block(_) | AgentError::Io { .. } => Code::Internal,
            AgentError::Internal(_) => Code::Internal,
        }
    }

    /// The error and its sources on one line.
    pub fn one_line(&self) -> String {
        one_line(self)
    }
}

/// An error and its sources joined with ": ".
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s.replace('\n', " ")
}

impl From<AgentError> for tonic::Status {
    fn from(e: AgentError) -> Self {
        tonic::Status::new(e.code(), e.one_line())
    }
}

/// Shorthand.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_in_one_place() {
        let vmm = |code| {
            AgentError::vmm(
                "restore",
                ClientError::Vmm {
                    path: "/s".into(),
                    request: "restore",
                    source: grove_vmm_api::ApiError::new(code, "x"),
                },
            )
        };
        assert_eq!(vmm(ErrorCode::Incompatible).code(), tonic::Code::FailedPrecondition);
        let guest = |code, errno| AgentError::Guest {
            what: "write".into(),
            source: grove_proto::client::ClientError::Guest { code, errno, message: "x".into() },
        };
        use grove_proto::guest::ErrorCode as G;
        assert_eq!(guest(G::Io, 28).code(), tonic::Code::ResourceExhausted, "ENOSPC");
        assert_eq!(guest(G::Io, 5).code(), tonic::Code::Internal, "EIO");
        assert_eq!(guest(G::OutsideRoot, 0).code(), tonic::Code::PermissionDenied);
        assert_eq!(guest(G::SpawnFailed, 2).code(), tonic::Code::FailedPrecondition);
        assert_eq!(vmm(ErrorCode::Corrupt).code(), tonic::Code::DataLoss);
        assert_eq!(
            AgentError::Catalog(CatalogError::InUse("t".into())).code(),
            tonic::Code::FailedPrecondition
        );
        let s: tonic::Status = AgentError::NotFound("sandbox sb-1".into()).into();
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(s.message(), "sandbox sb-1 not found");
        let s: tonic::Status = vmm(ErrorCode::NotFound).into();
        assert!(
            s.message().contains("VMM restore") && s.message().contains(": x"),
            "{}",
            s.message()
        );
    }
}
