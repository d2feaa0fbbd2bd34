//! Enqueue throughput and latency with OpenTelemetry export off (the
//! default) and on, beside each other: with tracing off the hot path has
//! no OpenTelemetry layer at all; with it on, every span goes to an OTLP
//! receiver started here on loopback.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio_util::sync::CancellationToken;

use crate::daemon::{Backend, CpuSample, Target};
use crate::load;
use crate::report::{thousands, Report};
use crate::Settings;

const CLIENTS: usize = 16;

/// An OTLP/gRPC trace receiver that only counts spans.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(spans as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

pub async fn tracing(settings: &Settings, report: &mut Report) -> anyhow::Result<()> {
    if settings.server.is_some() {
        report.context("tracing: starts its own daemons; not run with --server".to_owned());
        return Ok(());
    }
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let receiver_addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let server = tokio::spawn({
        let (receiver, stop) = (receiver.clone(), stop.clone());
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                stop.cancelled_owned(),
            )
    });
    let on = std::env::temp_dir().join(format!(
        "actionsd-bench-{}-tracing.toml",
        std::process::id()
    ));
    std::fs::write(
        &on,
        format!("[tracing]\notlp_endpoint = \"http://{receiver_addr}\"\n"),
    )?;
    let result = async {
        for (label, config) in [("off", None), ("on", Some(on.clone()))] {
            let settings = Settings {
                duration: settings.duration,
                smoke: settings.smoke,
                database_url: settings.database_url.clone(),
                server: None,
                actionsd: settings.actionsd.clone(),
                pgbench: settings.pgbench.clone(),
                daemon_config: config,
            };
            let target = Target::start(&settings, Backend::Postgres).await?;
            let measured = async {
                let channels = load::connect(&target.url, CLIENTS.div_ceil(8)).await?;
                let spec = load::task_spec(900);
                let spans_before = receiver.spans.load(Ordering::Relaxed);
                let cpu_before = CpuSample::take(target.pid());
                let (count, elapsed, latency) =
                    crate::enqueue::enqueue_load(&channels, CLIENTS, settings.duration, &spec)
                        .await?;
                let cpu = CpuSample::take(target.pid()).since(&cpu_before);
                // The batch exporter sends within a few seconds.
                tokio::time::sleep(std::time::Duration::from_secs(6)).await;
                let spans = receiver.spans.load(Ordering::Relaxed) - spans_before;
                let rate = count as f64 / elapsed.as_secs_f64();
                report.figure(
                    &format!("enqueue ×{CLIENTS} tracing {label}"),
                    "enqueues/s",
                    format!("{}/s", thousands(rate)),
                    if label == "on" { "—" } else { "baseline" },
                    format!("{} spans received", thousands(spans as f64)),
                );
                report.figure(
                    &format!("enqueue ×{CLIENTS} tracing {label}"),
                    "Enqueue latency",
                    latency.summary(),
                    "—",
                    String::new(),
                );
                report.context(cpu);
                if label == "on" {
                    anyhow::ensure!(spans > 0, "tracing on: the receiver got no span");
                } else {
                    anyhow::ensure!(spans == 0, "tracing off: {spans} spans were exported");
                }
                anyhow::Ok(())
            }
            .await;
            target.stop().await;
            measured?;
        }
        anyhow::Ok(())
    }
    .await;
    stop.cancel();
    let _ = server.await;
    let _ = std::fs::remove_file(&on);
    result
}
