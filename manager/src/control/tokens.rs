//! `mesh join-token [--rotate] worker|manager`: the current token of a role,
//! rotated first if asked. A new token is made here, on the manager the CLI
//! talks to, and travels in the command, so `apply` stays deterministic.

use mesh_common::model::NodeRole;
use mesh_common::{pki, token};
use tonic::Status;

use crate::manager::Manager;
use crate::state::Command;
use mesh_common::refusal::Refusal;

/// The role a token request names.
pub fn parse_role(role: &str) -> Result<NodeRole, Refusal> {
    role.parse()
        .map_err(|_| Refusal::invalid(format!("unknown role {role:?}: use worker or manager")))
}

/// The join token of `role`, after rotating it if `rotate`.
pub async fn join_token(mgr: &Manager, role: &str, rotate: bool) -> Result<String, Status> {
    let role = parse_role(role)?;
    let no_state = || Refusal::precondition("no cluster state");
    if rotate {
        let ca = mgr
            .read(|s| s.cluster.as_ref().map(|c| c.ca_cert_pem.clone()))
            .ok_or_else(no_state)?;
        let der = pki::pem_to_der(&ca).map_err(|e| Status::internal(e.to_string()))?;
        let cmd = Command::RotateToken {
            role: role.to_string(),
            token: token::generate(&der),
        };
        mgr.write(cmd).await?;
    }
    let token = mgr
        .read(|s| {
            s.cluster.as_ref().map(|c| match role {
                NodeRole::Worker => c.worker_token.clone(),
                NodeRole::Manager => c.manager_token.clone(),
            })
        })
        .ok_or_else(no_state)?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_two_roles_have_tokens() {
        assert_eq!(parse_role("manager"), Ok(NodeRole::Manager));
        assert!(parse_role("boss").is_err_and(|e| e.contains("use worker or manager")));
    }
}
