//! Conversions between the state's types and the Control API's protobuf
//! messages, one file per family. The wire keeps strings; the state keeps
//! types, so every conversion to the wire is total and every conversion
//! from it is checked.

pub mod network;
pub mod node;
pub mod service;
