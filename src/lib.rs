//! testrunner-operator: runs CI test workers off a RabbitMQ ticket queue on
//! Kubernetes. Scales worker pods to the queue depth and reports what it sees.
//!
//! Layout: [`crd`] (the custom resource), [`core`] (pure decisions), [`controller`]
//! (the kube-runtime shell), [`broker`] (RabbitMQ), [`pods`] (worker pod builder),
//! [`metrics`] and [`http`] (observability), [`telemetry`] (logs).

pub mod alerts;
pub mod broker;
pub mod check;
pub mod contract;
pub mod controller;
pub mod core;
pub mod crd;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod pods;
pub mod sim;
pub mod telemetry;
pub mod worker;
