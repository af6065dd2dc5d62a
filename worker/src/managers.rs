//! Calls from a node to "some manager": tries the managers the session last
//! heard of, starting with the one that answered last, over mutual TLS with
//! the node's own certificate; a server counts as a manager only if the
//! cluster lists it as one, with the key its certificate is for.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_common::tls::{self, ReloadableIdentity, TrustedManagers};
use tonic::transport::Channel;

#[derive(Clone)]
pub struct Managers {
    tls: Arc<rustls::ClientConfig>,
    addrs: Arc<Mutex<Vec<String>>>,
}

impl Managers {
    /// Managers are accepted only if `trusted` lists them with the key
    /// their certificate is for.
    pub fn new(
        ca_pem: &str,
        identity: ReloadableIdentity,
        addrs: Vec<String>,
        trusted: TrustedManagers,
    ) -> Result<Self, tls::TlsError> {
        Ok(Self {
            tls: tls::member_client_config(ca_pem, identity, Arc::new(trusted))?,
            addrs: Arc::new(Mutex::new(addrs)),
        })
    }

    pub fn set_addrs(&self, addrs: Vec<String>) {
        if !addrs.is_empty() {
            *self.addrs.lock().unwrap_or_else(|e| e.into_inner()) = addrs;
        }
    }

    /// A channel to one manager (for streams kept per manager).
    pub fn channel_to(&self, addr: &str) -> Result<Channel, tls::TlsError> {
        tls::channel(
            addr,
            self.tls.clone(),
            tls::MANAGER_SERVER_NAME,
            Duration::from_secs(2),
        )
    }

    /// Every manager this node knows of.
    pub fn addrs(&self) -> Vec<String> {
        self.addrs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs `f` against each manager in turn until one answers with
    /// something other than "unavailable"; remembers who answered.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, tonic::Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let addrs = Managers::addrs(self);
        let mut last =
            tonic::Status::unavailable("no manager known: is this node part of a cluster?");
        for (i, addr) in addrs.iter().enumerate() {
            let ch = match tls::channel(
                addr,
                self.tls.clone(),
                tls::MANAGER_SERVER_NAME,
                Duration::from_secs(2),
            ) {
                Ok(c) => c,
                Err(e) => {
                    last = tonic::Status::unavailable(e.to_string());
                    continue;
                }
            };
            match f(ch).await {
                Err(s) if s.code() == tonic::Code::Unavailable => last = s,
                r => {
                    if i != 0 {
                        let mut list = self.addrs.lock().unwrap_or_else(|e| e.into_inner());
                        list.retain(|a| a != addr);
                        list.insert(0, addr.clone());
                    }
                    return r;
                }
            }
        }
        Err(last)
    }
}
