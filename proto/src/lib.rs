//! The wire contract between the CLI, daemons and managers, generated from
//! `mesh.proto`. Nothing but generated code lives here; conversions to the
//! domain types live beside those types.
#![allow(clippy::all, clippy::unwrap_used)]

tonic::include_proto!("mesh");
