//! One trace per inbound webhook spans ingress → RabbitMQ → routing → flow-callback: the
//! services export to an OTLP receiver running in this test process, and the spans must share
//! the trace id and chain parent to child across the three processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use shopctrl_e2e::{
    flow_receiver::{Handover, call_handover},
    webhooks::{Channel, Conversation},
};
use support::{Stack, StackOptions, eventually};

#[derive(Debug, Clone)]
struct SpanRecord {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<SpanRecord>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(SpanRecord {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_handover_through_routing_to_the_flow_callback() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn({
        let collector = collector.clone();
        async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        }
    });
    let stack = Stack::start_with(StackOptions {
        env: vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                format!("http://{addr}"),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
            ("OTEL_TRACES_SAMPLER".into(), "parentbased_always_on".into()),
        ],
        ..StackOptions::default()
    })
    .await;
    let shop = stack.create_shop("traced", 1, false).await;
    stack.add_agent("traced", "tia").await;
    // The handover must find tia's Chat permission in routing's copy; otherwise it queues and
    // the flow event comes later, in the trace of the config change that frees it.
    let pool = sqlx::PgPool::connect_with(stack.backends.db.options())
        .await
        .unwrap();
    eventually(Duration::from_secs(30), || async {
        let granted: Option<bool> = sqlx::query_scalar(
            "select chat_permission from routing.shop_members
             where shop_id = 'traced' and employee_id = 'tia'",
        )
        .fetch_optional(&pool)
        .await
        .ok()
        .flatten();
        (granted == Some(true)).then_some(())
    })
    .await
    .expect("routing learned tia's Chat permission");
    pool.close().await;

    let c = Conversation::new(Channel::WhatsApp, "31600000071");
    stack.customer_says(&shop, &c, "hello").await;
    let handover = Handover {
        conversation_id: c.conversation_id.clone(),
        msisdn: c.msisdn.clone(),
        ..Handover::default()
    };
    // The flow calls twice, as a flow retrying its HTTP step does. The second call finds the
    // conversation assigned and re-emits that result in its own trace, so one handover's trace
    // is complete even when the config event that granted tia's permission (still in flight
    // after routing's copy showed it) drained the queue first and assigned the conversation in
    // that event's trace.
    for calls in 1..=2 {
        let (status, _) = call_handover(
            &stack.http,
            &stack.ingress_url,
            "traced",
            &shop.handover_secret,
            &handover,
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        stack
            .flows
            .wait_for_calls(calls, Duration::from_secs(20))
            .await;
    }

    // A trace with spans of all three services, linked parent to child across processes.
    let found = eventually(Duration::from_secs(30), || async {
        let spans = collector.0.lock().unwrap().clone();
        let by_id: HashMap<&str, &SpanRecord> =
            spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
        let mut traces: HashMap<&str, Vec<&SpanRecord>> = HashMap::new();
        for span in &spans {
            traces.entry(span.trace_id.as_str()).or_default().push(span);
        }
        traces.into_iter().find_map(|(trace_id, spans)| {
            let crosses = |child_service: &str, parent_service: &str| {
                spans.iter().any(|s| {
                    s.service == child_service
                        && by_id
                            .get(s.parent_span_id.as_str())
                            .is_some_and(|p| p.service == parent_service && p.trace_id == trace_id)
                })
            };
            (crosses("routing", "ingress") && crosses("flow-callback", "routing")).then(|| {
                spans
                    .iter()
                    .map(|s| format!("{}:{}", s.service, s.name))
                    .collect::<Vec<_>>()
            })
        })
    })
    .await;
    let spans = collector.0.lock().unwrap().clone();
    let found = found.unwrap_or_else(|| {
        panic!(
            "no trace links ingress → routing → flow-callback; spans seen:\n{}",
            spans
                .iter()
                .map(|s| format!(
                    "{} {} trace={} span={} parent={}",
                    s.service, s.name, s.trace_id, s.span_id, s.parent_span_id
                ))
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    assert!(found.len() >= 3, "{found:?}");
}
