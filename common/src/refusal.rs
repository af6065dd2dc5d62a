//! Why the managers said no: one typed error for every refusal of the
//! state machine and the control API, mapped once to a gRPC code, so a
//! client can tell "no such thing" from "not now" without reading prose.

use serde::{Deserialize, Serialize};

/// What kind of no it is; each maps to one gRPC code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalKind {
    /// The thing named does not exist.
    NotFound,
    /// A name, ID or address is taken.
    AlreadyExists,
    /// The request is malformed, whatever the state.
    InvalidArgument,
    /// The request is well formed but the state does not allow it now.
    FailedPrecondition,
    /// The cluster cannot answer now (no quorum, no leader); retry later.
    Unavailable,
}

/// A refusal with the one line the user sees.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Self {
        Refusal {
            kind,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(RefusalKind::NotFound, message)
    }

    pub fn already_exists(message: impl Into<String>) -> Self {
        Self::new(RefusalKind::AlreadyExists, message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(RefusalKind::InvalidArgument, message)
    }

    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(RefusalKind::FailedPrecondition, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(RefusalKind::Unavailable, message)
    }

    /// Whether the message mentions `needle` (tests and callers that
    /// match on what the user would read).
    pub fn contains(&self, needle: &str) -> bool {
        self.message.contains(needle)
    }
}

impl From<crate::ipam::IpamError> for Refusal {
    /// Malformed input is the caller's to fix; running out or overlapping
    /// depends on what the cluster already holds.
    fn from(e: crate::ipam::IpamError) -> Self {
        use crate::ipam::IpamError as E;
        let kind = match e {
            E::Exhausted { .. }
            | E::Overlap { .. }
            | E::NoPools
            | E::VniExhausted
            | E::HostsExhausted(_) => RefusalKind::FailedPrecondition,
            _ => RefusalKind::InvalidArgument,
        };
        Refusal::new(kind, e.to_string())
    }
}

impl From<crate::model::UnknownWord> for Refusal {
    fn from(e: crate::model::UnknownWord) -> Self {
        Refusal::invalid(e.to_string())
    }
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        let code = match r.kind {
            RefusalKind::NotFound => tonic::Code::NotFound,
            RefusalKind::AlreadyExists => tonic::Code::AlreadyExists,
            RefusalKind::InvalidArgument => tonic::Code::InvalidArgument,
            RefusalKind::FailedPrecondition => tonic::Code::FailedPrecondition,
            RefusalKind::Unavailable => tonic::Code::Unavailable,
        };
        tonic::Status::new(code, r.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_grpc_codes_with_the_message() {
        let s = tonic::Status::from(Refusal::not_found("No such network: x"));
        assert_eq!(
            (s.code(), s.message()),
            (tonic::Code::NotFound, "No such network: x")
        );
        let cases = [
            (Refusal::already_exists("a"), tonic::Code::AlreadyExists),
            (Refusal::invalid("a"), tonic::Code::InvalidArgument),
            (Refusal::precondition("a"), tonic::Code::FailedPrecondition),
            (Refusal::unavailable("a"), tonic::Code::Unavailable),
        ];
        for (r, code) in cases {
            assert_eq!(tonic::Status::from(r).code(), code);
        }
    }

    #[test]
    fn malformed_subnets_are_invalid_and_overlaps_are_not() {
        let bad = crate::ipam::parse_subnet("10.1.0.0/33").expect_err("malformed");
        assert_eq!(Refusal::from(bad).kind, RefusalKind::InvalidArgument);
        let a = crate::ipam::parse_subnet("10.1.0.0/24").expect("valid");
        let overlap = crate::ipam::check_overlap(&a, [("x", &a)]).expect_err("overlaps");
        assert_eq!(Refusal::from(overlap).kind, RefusalKind::FailedPrecondition);
    }
}
