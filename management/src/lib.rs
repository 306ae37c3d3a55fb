//! Tern management service: the SQL store (SQLite or PostgreSQL), the pure network-map function,
//! the agent-facing gRPC service (sealed login, streaming network map), the admin REST API, public
//! services (ports on the server carried to targets in the mesh), and the wiring that serves them (plus signal, in the all-in-one `tern-server`) on one port.

pub mod api;
pub mod auth;
pub mod bootstrap;
pub mod cli;
pub mod grpc;
pub mod model;
pub mod netmap;
pub mod oidc;
pub mod publish;
pub mod server;
pub mod state;
pub mod store;
pub mod web;
pub mod wgdev;
