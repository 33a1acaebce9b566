//! testrunner-operator: runs CI test workers off a RabbitMQ ticket queue on
//! Kubernetes. Scales worker pods to the queue depth and reports what it sees.
//!
//! Layout: [`contract`] (the wire between the worker wrapper and the operator: exit
//! codes, termination-log lines, reports, the quarantine list, ticket ids and headers),
//! [`crd`] (the custom resource), [`core`] (pure decisions, a pipeline of steps),
//! [`controller`] (the kube-runtime shell: observe, apply, cleanup), [`broker`]
//! (RabbitMQ), [`pods`] (worker pod builder), [`worker`] (the wrapper that runs in
//! worker pods), [`alerts`] (alert delivery), [`metrics`] and [`http`]
//! (observability), [`leader`] (leader election), [`check`] (the Nagios check),
//! [`telemetry`] (logs), [`publish`] (test tickets onto a queue) and [`backoff`]
//! (retry delays). The library does not depend on the simulated cluster (the
//! `testrunner-sim` crate): only the binary's `simulate` command does, with the
//! `simulate` feature (on by default).
//!
//! # Layering
//!
//! A module uses only modules below it, so no module uses one that uses it back,
//! directly or through others:
//!
//! 1. [`contract`] and [`crd`] are the bottom: they use no other module;
//! 2. [`core`] uses only them: it stays pure;
//! 3. the shells use the layers below and one another without loops: [`backoff`],
//!    [`broker`] (backoff, contract), [`worker`] (broker, contract), [`pods`] (core,
//!    crd, contract), [`metrics`] (broker), [`alerts`] (backoff, core, metrics),
//!    [`http`] (metrics), [`leader`] and [`check`] (crd), [`publish`] (broker),
//!    [`telemetry`];
//! 4. [`controller`] is on top and uses any of them;
//! 5. the binary (`src/main.rs`, and `src/simulate.rs` for its `simulate` command)
//!    wires them together.
//!
//! `tests/layering.rs` checks this on the sources (points 1, 2 and the absence of
//! loops).

pub mod alerts;
pub mod backoff;
pub mod broker;
pub mod check;
pub mod contract;
pub mod controller;
pub mod core;
pub mod crd;
pub mod describe;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod pods;
pub mod publish;
pub mod telemetry;
pub mod worker;
