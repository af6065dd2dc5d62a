//! Raft membership: adding and removing voters, and who may speak Raft.

use super::*;

impl Manager {
    /// from the log or a snapshot), then as a voter.
    pub async fn add_voter(&self, raft_id: u64, addr: &str) -> Result<(), ManagerError> {
        self.raft
            .add_learner(
                raft_id,
                BasicNode {
                    addr: addr.to_string(),
                },
                true,
            )
            .await
            .map_err(|e| ManagerError::Raft(format!("adding {addr} as learner: {e}")))?;
        let mut voters: std::collections::BTreeSet<u64> = self.voters().into_iter().collect();
        voters.insert(raft_id);
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| ManagerError::Raft(format!("adding {addr} as voter: {e}")))?;
        Ok(())
    }

    /// Removes a manager from the Raft voters (demotion or removal).
    pub async fn remove_voter(&self, raft_id: u64) -> Result<(), ManagerError> {
        let mut voters: std::collections::BTreeSet<u64> = self.voters().into_iter().collect();
        if !voters.remove(&raft_id) {
            return Ok(());
        }
        self.raft
            .change_membership(voters, false)
            .await
            .map_err(|e| ManagerError::Raft(format!("removing manager from Raft: {e}")))?;
        Ok(())
    }

    /// Raft IDs of the current membership, voters and learners.
    pub fn raft_members(&self) -> Vec<u64> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether `who` may send this manager Raft messages, as Raft node
    /// `claimed` if given. Until this manager has any state (just promoted,
    /// not yet caught up), it accepts the managers it knew of as a member.
    pub fn check_raft_caller(
        &self,
        who: &NodeIdentity,
        claimed: Option<u64>,
    ) -> Result<(), authz::Denied> {
        let own = mesh_common::id::raft_id(&who.node_id);
        let claimed = claimed.unwrap_or(own);
        let members = self.raft_members();
        let strict = self.read(|s| {
            s.cluster
                .as_ref()
                .map(|_| authz::raft_caller(s, &members, who, claimed))
        });
        // What this node was told of the managers (join reply, heartbeats).
        let by_trusted = || {
            self.trusted
                .check_manager(who)
                .map_err(|_| authz::Denied::NotInRaft(who.node_id.clone()))?;
            if own != claimed {
                return Err(authz::Denied::NotOwnRaftId {
                    node: who.node_id.clone(),
                    own,
                    claimed,
                });
            }
            Ok(())
        };
        match strict {
            // No state yet (just promoted), or a node this replica's state
            // does not know yet (it lags: the manager joined in entries not
            // applied here) but its Raft membership holds.
            None => by_trusted(),
            Some(Err(authz::Denied::Unknown(_))) if members.contains(&own) => by_trusted(),
            Some(r) => r,
        }
    }

    /// Raft IDs of the current voters.
    pub fn voters(&self) -> Vec<u64> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    pub fn server_state(&self) -> ServerState {
        self.raft.metrics().borrow().state
    }
}

impl Manager {
    /// Asks the leader to change Raft membership for `node_id`: add it (it
    /// must be the caller) or remove it. Runs locally on the leader.
    pub async fn membership_call(
        &self,
        req: mesh_proto::JoinRaftRequest,
    ) -> Result<(), ManagerError> {
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT * 2;
        loop {
            if self.is_leader() && req.remove {
                let raft_id = self.read(|s| s.nodes.get(&req.node_id).map(|n| n.raft_id));
                let raft_id = raft_id.ok_or_else(|| {
                    ManagerError::Refused(mesh_common::refusal::Refusal::not_found(format!(
                        "node {} not found",
                        req.node_id
                    )))
                })?;
                return self.remove_voter(raft_id).await;
            }
            if let Some(addr) = self.leader_addr() {
                let channel = self.forward_channel(&addr)?;
                match ClusterClient::new(channel).join_raft(req.clone()).await {
                    Ok(_) => return Ok(()),
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::Unavailable | tonic::Code::FailedPrecondition
                        ) => {}
                    Err(s) => {
                        return Err(ManagerError::Forward {
                            addr,
                            msg: s.message().to_string(),
                        });
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ManagerError::NoLeader(self.quorum_note()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
