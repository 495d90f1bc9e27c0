#!/usr/bin/env python3
"""Writes the JSON schemas deploy/check-chart.sh validates the chart's custom resources with.

The schemas are hand-written from the upstream CRD field lists (prometheus-operator v1,
KEDA v1alpha1): strict (unknown fields fail) for what this chart renders, by type only for
rarely used nested blocks. Edit this file, run it, commit both.
"""
import json, os
OUT = os.path.dirname(os.path.abspath(__file__))
DRAFT = "https://json-schema.org/draft/2020-12/schema"

def obj(props, required=(), extra=False, **kw):
    d = {"type": "object", "properties": props, "additionalProperties": extra}
    if required: d["required"] = list(required)
    d.update(kw)
    return d

string = {"type": "string"}
boolean = {"type": "boolean"}
integer = {"type": "integer"}
str_map = {"type": "object", "additionalProperties": {"type": "string"}}
any_obj = {"type": "object"}
duration = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
dns_label = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
dns_subdomain = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$", "maxLength": 253}

metadata = obj({
    "name": dns_subdomain,
    "namespace": dns_label,
    "labels": str_map,
    "annotations": str_map,
}, required=["name"], extra=True, description="ObjectMeta: only the fields checked here are constrained.")

label_selector = obj({
    "matchLabels": str_map,
    "matchExpressions": {"type": "array", "items": obj({
        "key": string,
        "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
        "values": {"type": "array", "items": string},
    }, required=["key", "operator"])},
})

secret_key_selector = obj({"name": string, "key": string, "optional": boolean}, required=["key"])

relabel_actions = ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                   "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                   "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                   "dropequal", "DropEqual"]
relabel = obj({
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": string,
    "targetLabel": string,
    "regex": string,
    "modulus": integer,
    "replacement": string,
    "action": {"enum": relabel_actions},
})

def doc(title, api, kind, spec):
    return {
        "$schema": DRAFT,
        "$comment": "Written for this chart's CI (deploy/check-chart.sh). Covers the fields of the "
                    "upstream CRD; the parts this chart renders are checked strictly (unknown fields "
                    "fail), rarely used nested blocks only by type.",
        "title": title,
        **obj({
            "apiVersion": {"const": api},
            "kind": {"const": kind},
            "metadata": metadata,
            "spec": spec,
        }, required=["apiVersion", "kind", "metadata", "spec"]),
    }

# --- ServiceMonitor (monitoring.coreos.com/v1) ---
endpoint = obj({
    "port": string,
    "targetPort": {"type": ["integer", "string"]},
    "path": string,
    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "params": {"type": "object", "additionalProperties": {"type": "array", "items": string}},
    "interval": duration,
    "scrapeTimeout": duration,
    "tlsConfig": any_obj,
    "bearerTokenFile": string,
    "bearerTokenSecret": secret_key_selector,
    "authorization": obj({"type": string, "credentials": secret_key_selector}),
    "basicAuth": obj({"username": secret_key_selector, "password": secret_key_selector}),
    "oauth2": any_obj,
    "honorLabels": boolean,
    "honorTimestamps": boolean,
    "trackTimestampsStaleness": boolean,
    "metricRelabelings": {"type": "array", "items": relabel},
    "relabelings": {"type": "array", "items": relabel},
    "proxyUrl": string,
    "noProxy": string,
    "proxyFromEnvironment": boolean,
    "proxyConnectHeader": any_obj,
    "followRedirects": boolean,
    "enableHttp2": boolean,
    "filterRunning": boolean,
}, description="One scrape endpoint.", anyOf=[{"required": ["port"]}, {"required": ["targetPort"]}])

servicemonitor = doc("ServiceMonitor", "monitoring.coreos.com/v1", "ServiceMonitor", obj({
    "jobLabel": string,
    "targetLabels": {"type": "array", "items": string},
    "podTargetLabels": {"type": "array", "items": string},
    "endpoints": {"type": "array", "items": endpoint, "minItems": 1},
    "selector": label_selector,
    "selectorMechanism": {"enum": ["RelabelConfig", "RoleSelector"]},
    "namespaceSelector": obj({"any": boolean, "matchNames": {"type": "array", "items": string}}),
    "sampleLimit": {"type": "integer", "minimum": 0},
    "targetLimit": {"type": "integer", "minimum": 0},
    "labelLimit": {"type": "integer", "minimum": 0},
    "labelNameLengthLimit": {"type": "integer", "minimum": 0},
    "labelValueLengthLimit": {"type": "integer", "minimum": 0},
    "keepDroppedTargets": {"type": "integer", "minimum": 0},
    "scrapeProtocols": {"type": "array", "items": {"enum": ["PrometheusProto", "OpenMetricsText0.0.1", "OpenMetricsText1.0.0", "PrometheusText0.0.4", "PrometheusText1.0.0"]}},
    "fallbackScrapeProtocol": {"enum": ["PrometheusProto", "OpenMetricsText0.0.1", "OpenMetricsText1.0.0", "PrometheusText0.0.4", "PrometheusText1.0.0"]},
    "scrapeClassicHistograms": boolean,
    "nativeHistogramBucketLimit": {"type": "integer", "minimum": 0},
    "nativeHistogramMinBucketFactor": {"type": ["number", "string"]},
    "convertClassicHistogramsToNHCB": boolean,
    "attachMetadata": obj({"node": boolean}),
    "scrapeClass": string,
    "bodySizeLimit": string,
    "serviceDiscoveryRole": {"enum": ["Endpoints", "EndpointSlice"]},
}, required=["selector", "endpoints"]))

# --- PrometheusRule (monitoring.coreos.com/v1) ---
rule = obj({
    "alert": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
    "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
    "expr": {"type": ["string", "integer"], "minLength": 1},
    "for": duration,
    "keep_firing_for": {"type": "string", "minLength": 1},
    "labels": {"type": "object", "additionalProperties": {"type": "string"},
               "propertyNames": {"pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"},
                    "propertyNames": {"pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
}, required=["expr"], oneOf=[{"required": ["alert"]}, {"required": ["record"]}])
# Alerts page people: every alert here must say how bad it is and what happened.
rule["if"] = {"required": ["alert"]}
rule["then"] = {"required": ["labels", "annotations"],
                "properties": {"labels": {"required": ["severity"],
                                          "properties": {"severity": {"enum": ["critical", "warning", "info"]}}},
                               "annotations": {"required": ["summary", "description"]}}}
prometheusrule = doc("PrometheusRule", "monitoring.coreos.com/v1", "PrometheusRule", obj({
    "groups": {"type": "array", "minItems": 1, "items": obj({
        "name": {"type": "string", "minLength": 1},
        "interval": duration,
        "query_offset": duration,
        "limit": integer,
        "partial_response_strategy": string,
        "labels": str_map,
        "rules": {"type": "array", "minItems": 1, "items": rule},
    }, required=["name", "rules"])},
}))

# --- ScaledObject (keda.sh/v1alpha1) ---
rabbitmq_meta = obj({
    "host": string,
    "hostFromEnv": string,
    "usernameFromEnv": string,
    "passwordFromEnv": string,
    "protocol": {"enum": ["amqp", "http", "auto"]},
    "mode": {"enum": ["QueueLength", "MessageRate"]},
    "value": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
    "activationValue": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
    "queueName": {"type": "string", "minLength": 1},
    "vhostName": string,
    "useRegex": {"enum": ["true", "false"]},
    "excludeUnacknowledged": {"enum": ["true", "false"]},
    "pageSize": string,
    "operation": {"enum": ["sum", "max", "avg"]},
    "timeout": string,
    "unsafeSsl": {"enum": ["true", "false"]},
}, required=["queueName", "mode", "value"],
   anyOf=[{"required": ["host"]}, {"required": ["hostFromEnv"]}],
   description="Metadata of the rabbitmq scaler, the only scaler this chart renders.")
trigger = obj({
    "type": {"type": "string", "minLength": 1},
    "name": string,
    "useCachedMetrics": boolean,
    "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
    "authenticationRef": obj({"name": string, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}}, required=["name"]),
}, required=["type", "metadata"])
trigger["if"] = {"properties": {"type": {"const": "rabbitmq"}}}
trigger["then"] = {"properties": {"metadata": rabbitmq_meta}}
hpa_policy = obj({"type": {"enum": ["Pods", "Percent"]}, "value": {"type": "integer", "minimum": 1},
                  "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800}},
                 required=["type", "value", "periodSeconds"])
hpa_rules = obj({"stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
                 "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
                 "tolerance": {"type": ["number", "string"]},
                 "policies": {"type": "array", "items": hpa_policy}})
scaledobject = doc("ScaledObject", "keda.sh/v1alpha1", "ScaledObject", obj({
    "scaleTargetRef": obj({"apiVersion": string, "kind": string, "name": {"type": "string", "minLength": 1},
                           "envSourceContainerName": string}, required=["name"]),
    "pollingInterval": {"type": "integer", "minimum": 1},
    "cooldownPeriod": {"type": "integer", "minimum": 0},
    "initialCooldownPeriod": {"type": "integer", "minimum": 0},
    "idleReplicaCount": {"type": "integer", "minimum": 0},
    "minReplicaCount": {"type": "integer", "minimum": 0},
    "maxReplicaCount": {"type": "integer", "minimum": 1},
    "fallback": obj({"failureThreshold": {"type": "integer", "minimum": 1}, "replicas": {"type": "integer", "minimum": 0},
                     "behavior": {"enum": ["static", "currentReplicas", "currentReplicasIfHigher", "currentReplicasIfLower"]}},
                    required=["failureThreshold", "replicas"]),
    "advanced": obj({
        "restoreToOriginalReplicaCount": boolean,
        "horizontalPodAutoscalerConfig": obj({"name": string, "behavior": obj({"scaleUp": hpa_rules, "scaleDown": hpa_rules})}),
        "scalingModifiers": any_obj,
    }),
    "triggers": {"type": "array", "minItems": 1, "items": trigger},
}, required=["scaleTargetRef", "triggers"]))
# min <= max is not expressible in plain JSON schema; the chart's values schema covers it.

for name, d in [("servicemonitor", servicemonitor), ("prometheusrule", prometheusrule), ("scaledobject", scaledobject)]:
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(d, f, indent=2)
        f.write("\n")
print("ok")
