//! W3C trace context (`traceparent`, `tracestate`) in and out of message headers.

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct MapInjector<'a>(&'a mut Vec<(String, String)>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

/// Borrowed header pairs: a propagator asks for two or three names, so a scan with a
/// case-insensitive compare is cheaper than building a map of every header of a request.
struct PairsExtractor<'a>(&'a [(&'a str, &'a str)]);

impl Extractor for PairsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(key))
            .map(|(_, value)| *value)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| *name).collect()
    }
}

/// The trace context of the current tracing span as header pairs, ready to put into AMQP
/// message headers. Empty when no trace is active.
pub fn inject_current() -> Vec<(String, String)> {
    let context = tracing::Span::current().context();
    let mut headers = Vec::new();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MapInjector(&mut headers));
    });
    headers
}

/// The remote context carried by header pairs (names compared case-insensitively).
pub fn extract_context<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Context {
    let pairs: Vec<(&str, &str)> = headers.into_iter().collect();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&PairsExtractor(&pairs))
    })
}

/// The remote context of an incoming HTTP request.
pub fn extract_from_http(headers: &http::HeaderMap) -> Context {
    extract_context(
        headers
            .iter()
            .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v))),
    )
}

/// Makes `span` a child of the trace carried by the headers (no-op when none is carried).
pub fn set_parent_from_headers<'a>(
    span: &tracing::Span,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    // A span filtered out by the log level records nothing: skip reading the headers.
    if span.is_disabled() {
        return;
    }
    let context = extract_context(headers);
    // An error only means the span is disabled; nothing to propagate then.
    let _ = span.set_parent(context);
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt;

    use super::*;

    #[test]
    fn extracts_a_w3c_parent() {
        crate::init_for_tests();
        let context = extract_context([(
            "TraceParent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )]);
        let span = context.span();
        let span_context = span.span_context();
        assert!(span_context.is_valid());
        assert_eq!(
            span_context.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert!(
            extract_context([]).span().span_context().trace_id()
                == opentelemetry::trace::TraceId::INVALID
        );
    }
}
