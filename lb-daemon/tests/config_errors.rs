//! `lb.toml` → errors: each broken config reports exactly the expected line, key and message;
//! a full valid config yields the expected model.
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use lbd::config::model::*;
use lbd::config::{ConfigError, parse};

/// A listener and a cluster that make a config valid on their own.
const OK_TAIL: &str = r#"
[[listeners]]
name = "tail"
bind = "127.0.0.1:0"

[[clusters]]
name = "tail"
[[clusters.endpoints]]
address = "127.0.0.1:9999"
"#;

fn errors(text: &str) -> Vec<ConfigError> {
    match parse(text, Path::new("t.toml")) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.0,
    }
}

/// (what, config, line, key, message substring). Each config has exactly one problem.
const CASES: &[(&str, &str, usize, &str, &str)] = &[
    (
        "tracing without endpoint",
        "[tracing]\nsample_ratio = 0.5\n",
        1,
        "tracing.endpoint",
        "missing field",
    ),
    (
        "tracing endpoint not a URL",
        "[tracing]\nendpoint = \"127.0.0.1:4317\"\n",
        2,
        "tracing.endpoint",
        "no http:// scheme",
    ),
    (
        "tracing https endpoint",
        "[tracing]\nendpoint = \"https://otel.example:4317\"\n",
        2,
        "tracing.endpoint",
        "https collectors are not supported yet",
    ),
    (
        "tracing grpc endpoint with a path",
        "[tracing]\nendpoint = \"http://127.0.0.1:4317/v1/traces\"\n",
        2,
        "tracing.endpoint",
        "a gRPC endpoint has no path",
    ),
    (
        "tracing unknown protocol",
        "[tracing]\nendpoint = \"http://127.0.0.1:4317\"\nprotocol = \"http/json\"\n",
        3,
        "tracing.protocol",
        "unknown value \"http/json\"",
    ),
    (
        "tracing sample_ratio above 1",
        "[tracing]\nendpoint = \"http://127.0.0.1:4317\"\nsample_ratio = 1.5\n",
        3,
        "tracing.sample_ratio",
        "between 0.0 and 1.0, got 1.5",
    ),
    (
        "tracing sample_ratio negative",
        "[tracing]\nendpoint = \"http://127.0.0.1:4317\"\nsample_ratio = -0.1\n",
        3,
        "tracing.sample_ratio",
        "between 0.0 and 1.0",
    ),
    (
        "tracing queue_size 0",
        "[tracing]\nendpoint = \"http://127.0.0.1:4317\"\nqueue_size = 0\n",
        3,
        "tracing.queue_size",
        "got 0",
    ),
    (
        "tracing batch_size over queue_size",
        "[tracing]\nendpoint = \"http://127.0.0.1:4317\"\nqueue_size = 10\nbatch_size = 20\n",
        4,
        "tracing.batch_size",
        "must not exceed tracing.queue_size (10)",
    ),
    (
        "tracing zero timeout",
        "[tracing]\nendpoint = \"http://127.0.0.1:4317\"\ntimeout = \"0s\"\n",
        3,
        "tracing.timeout",
        "greater than 0",
    ),
    (
        "tracing bad flush_interval",
        "[tracing]\nendpoint = \"http://127.0.0.1:4317\"\nflush_interval = \"soon\"\n",
        3,
        "tracing.flush_interval",
        "",
    ),
    (
        "tracing empty service_name",
        "[tracing]\nendpoint = \"http://127.0.0.1:4317\"\nservice_name = \" \"\n",
        3,
        "tracing.service_name",
        "must not be empty",
    ),
    (
        "tracing unknown key",
        "[tracing]\nendpoint = \"http://127.0.0.1:4317\"\nsampler = \"always\"\n",
        3,
        "tracing.sampler",
        "unknown field",
    ),
    (
        "grpc service on an http check",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.health_check]\nservice = \"a.B\"\n",
        6,
        "clusters[0].health_check.service",
        "only used with kind = \"grpc\"",
    ),
    (
        "path on a grpc check",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.health_check]\nkind = \"grpc\"\npath = \"/x\"\n",
        7,
        "clusters[0].health_check.path",
        "only used with kind = \"http\"",
    ),
    (
        "grpc service name with a space",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.health_check]\nkind = \"grpc\"\nservice = \"a B\"\n",
        7,
        "clusters[0].health_check.service",
        "invalid gRPC service name",
    ),
    (
        "outlier negative consecutive_5xx",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.outlier]\nconsecutive_5xx = -1\n",
        6,
        "clusters[0].outlier.consecutive_5xx",
        "got -1",
    ),
    (
        "outlier max_ejection_percent 0",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.outlier]\nmax_ejection_percent = 0\n",
        6,
        "clusters[0].outlier.max_ejection_percent",
        "must be between 1 and 100, got 0",
    ),
    (
        "outlier max_ejection_percent over 100",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.outlier]\nmax_ejection_percent = 101\n",
        6,
        "clusters[0].outlier.max_ejection_percent",
        "must be between 1 and 100, got 101",
    ),
    (
        "outlier zero base_ejection_time",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.outlier]\nbase_ejection_time = \"0s\"\n",
        6,
        "clusters[0].outlier.base_ejection_time",
        "must be greater than 0",
    ),
    (
        "outlier zero interval",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.outlier]\ninterval = \"0s\"\n",
        6,
        "clusters[0].outlier.interval",
        "must be greater than 0",
    ),
    (
        "outlier unparsable interval",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.outlier]\ninterval = \"soon\"\n",
        6,
        "clusters[0].outlier.interval",
        "invalid duration \"soon\"",
    ),
    (
        "outlier max below base",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.outlier]\nbase_ejection_time = \"30s\"\nmax_ejection_time = \"10s\"\n",
        7,
        "clusters[0].outlier.max_ejection_time",
        "must not be less than base_ejection_time",
    ),
    (
        "outlier negative stdev factor",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.outlier]\nsuccess_rate_stdev_factor = -1.5\n",
        6,
        "clusters[0].outlier.success_rate_stdev_factor",
        "must be a number greater than 0",
    ),
    (
        "outlier zero success-rate hosts",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.outlier]\nsuccess_rate_minimum_hosts = 0\n",
        6,
        "clusters[0].outlier.success_rate_minimum_hosts",
        "got 0",
    ),
    (
        "outlier success-rate key with success rate off",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.outlier]\nsuccess_rate = false\nsuccess_rate_request_volume = 10\n",
        7,
        "clusters[0].outlier.success_rate_request_volume",
        "only used with success_rate = true",
    ),
    (
        "outlier unknown key",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.outlier]\nconsecutive_errors = 5\n",
        6,
        "clusters[0].outlier.consecutive_errors",
        "unknown field `consecutive_errors`",
    ),
    (
        "outlier with every detector off",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.outlier]\nconsecutive_5xx = 0\nsuccess_rate = false\n",
        5,
        "clusters[0].outlier",
        "every detector is off",
    ),
    (
        "grpc retry status on an http1 cluster",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.retry]\ngrpc_status = [\"unavailable\"]\n",
        6,
        "clusters[0].retry.grpc_status[0]",
        "only used with protocol = \"grpc\"",
    ),
    (
        "unknown grpc retry status",
        "[[clusters]]\nname = \"c\"\nprotocol = \"grpc\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.retry]\ngrpc_status = [\"unavailable\", \"busy\"]\n",
        7,
        "clusters[0].retry.grpc_status[1]",
        "unknown value \"busy\"",
    ),
    (
        "retry attempts over the cap",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.retry]\nattempts = 8\n",
        6,
        "clusters[0].retry.attempts",
        "between 0 and 7",
    ),
    (
        "unknown retry_on word",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.retry]\nretry_on = [\"reset\", \"5xxx\"]\n",
        6,
        "clusters[0].retry.retry_on[1]",
        "unknown value \"5xxx\"",
    ),
    (
        "retry_on status out of range",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[routes.retry]\nretry_on = [503, 200]\n",
        5,
        "routes[0].retry.retry_on[1]",
        "between 400 and 599",
    ),
    (
        "zero per_try_timeout",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[routes.retry]\nper_try_timeout = \"0s\"\n",
        5,
        "routes[0].retry.per_try_timeout",
        "greater than 0",
    ),
    (
        "max_replay_bytes over 16 MiB",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.retry]\nmax_replay_bytes = 100000000\n",
        6,
        "clusters[0].retry.max_replay_bytes",
        "at most 16777216",
    ),
    (
        "backoff_max below backoff_base",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.retry]\nbackoff_base = \"100ms\"\nbackoff_max = \"10ms\"\n",
        7,
        "clusters[0].retry.backoff_max",
        "at least backoff_base",
    ),
    (
        "negative replay bound",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[routes.retry]\nmax_replay_bytes = -1\n",
        5,
        "routes[0].retry.max_replay_bytes",
        "at least 0",
    ),
    (
        "budget ratio above 1",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.retry_budget]\nratio = 1.5\n",
        6,
        "clusters[0].retry_budget.ratio",
        "between 0.0 and 1.0",
    ),
    (
        "budget window not whole seconds",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.retry_budget]\nwindow = \"1500ms\"\n",
        6,
        "clusters[0].retry_budget.window",
        "whole seconds",
    ),
    (
        "negative budget floor",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.retry_budget]\nmin_per_second = -1\n",
        6,
        "clusters[0].retry_budget.min_per_second",
        "between 0 and",
    ),
    (
        "negative circuit breaker",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.circuit_breakers]\nmax_requests = -5\n",
        6,
        "clusters[0].circuit_breakers.max_requests",
        "at least 0",
    ),
    (
        "unknown circuit breaker",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.circuit_breakers]\nmax_streams = 5\n",
        6,
        "clusters[0].circuit_breakers.max_streams",
        "unknown field",
    ),
    (
        "negative max_connections",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.circuit_breakers]\nmax_connections = -1\n",
        6,
        "clusters[0].circuit_breakers.max_connections",
        "at least 0",
    ),
    (
        "max_connections not a number",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.circuit_breakers]\nmax_connections = \"10\"\n",
        6,
        "clusters[0].circuit_breakers.max_connections",
        "invalid type: string",
    ),
    (
        "zero hedge_delay",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[routes.retry]\nhedge_delay = \"0ms\"\n",
        5,
        "routes[0].retry.hedge_delay",
        "greater than 0",
    ),
    (
        "retry budget on a route",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[routes.retry]\nratio = 0.5\n",
        5,
        "routes[0].retry.ratio",
        "unknown field",
    ),
    (
        "unknown cluster protocol",
        "[[clusters]]\nname = \"c\"\nprotocol = \"grpc-web\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n",
        3,
        "clusters[0].protocol",
        "expected one of \"http1\", \"http2\", \"grpc\"",
    ),
    (
        "unknown top-level key",
        "lisener = 1\n[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n",
        1,
        "lisener",
        "unknown key",
    ),
    (
        "unknown key in a listener",
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\nbogus = 1\n",
        4,
        "listeners[0].bogus",
        "unknown field `bogus`",
    ),
    (
        "unknown key in a nested table",
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n[listeners.limits]\nmax_conns = 5\n",
        5,
        "listeners[0].limits.max_conns",
        "unknown field `max_conns`",
    ),
    (
        "wrong type",
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n[listeners.limits]\nmax_connections = \"many\"\n",
        5,
        "listeners[0].limits.max_connections",
        "invalid type",
    ),
    (
        "missing required field",
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n\n[[listeners]]\nbind = \"127.0.0.1:81\"\n",
        5,
        "listeners[1].name",
        "missing field `name`",
    ),
    (
        "TOML syntax error",
        "[[listeners]\nname = \"a\"\n",
        1,
        "",
        "TOML syntax",
    ),
    (
        "nothing to serve",
        "[global]\nlog_level = \"info\"\n",
        1,
        "",
        "nothing to serve",
    ),
    (
        "bad enum value",
        "[global]\nlog_format = \"xml\"\n",
        2,
        "global.log_format",
        "expected one of \"text\", \"json\"",
    ),
    (
        "no workers",
        "[global]\nworkers = 0\n",
        2,
        "global.workers",
        "must be between 1 and 1024, got 0",
    ),
    (
        "duration without unit",
        "[global]\ndrain_timeout = \"30\"\n",
        2,
        "global.drain_timeout",
        "missing unit",
    ),
    (
        "admin bind unparseable",
        "[admin]\nbind = \"localhost:9901\"\n",
        2,
        "admin.bind",
        "invalid address \"localhost:9901\"",
    ),
    (
        "admin on a listener's address",
        "[admin]\nbind = \"127.0.0.1:8080\"\n[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:8080\"\n",
        2,
        "admin.bind",
        "127.0.0.1:8080 is also the bind of listener \"a\"",
    ),
    (
        "duplicate listener name",
        "[[listeners]]\nname = \"tail\"\nbind = \"127.0.0.1:80\"\n",
        6,
        "listeners[1].name",
        "duplicate listener name \"tail\" (first defined on line 2)",
    ),
    (
        "duplicate listener bind",
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n[[listeners]]\nname = \"b\"\nbind = \"127.0.0.1:80\"\n",
        6,
        "listeners[1].bind",
        "duplicate listener bind 127.0.0.1:80 (first used on line 3)",
    ),
    (
        "zero request timeout",
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n[listeners.limits]\nrequest_timeout = \"0s\"\n",
        5,
        "listeners[0].limits.request_timeout",
        "greater than 0",
    ),
    (
        "negative body limit",
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n[listeners.limits]\nmax_body_bytes = -1\n",
        5,
        "listeners[0].limits.max_body_bytes",
        "got -1",
    ),
    (
        "route to unknown cluster",
        "[[routes]]\nname = \"r\"\ncluster = \"nope\"\n",
        3,
        "routes[0].cluster",
        "unknown cluster \"nope\"",
    ),
    (
        "route with neither cluster nor split",
        "[[routes]]\nname = \"r\"\npriority = 1\n",
        1,
        "routes[0].cluster",
        "missing: set `cluster`, or `split`",
    ),
    (
        "route with both cluster and split",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\nsplit = [{ cluster = \"tail\", weight = 1 }]\n",
        4,
        "routes[0].split",
        "`cluster` and `split` exclude each other",
    ),
    (
        "split to unknown cluster",
        "[[routes]]\nname = \"r\"\nsplit = [{ cluster = \"tail\", weight = 9 },\n  { cluster = \"nope\", weight = 1 }]\n",
        4,
        "routes[0].split[1].cluster",
        "unknown cluster \"nope\"",
    ),
    (
        "split weight out of range",
        "[[routes]]\nname = \"r\"\nsplit = [{ cluster = \"tail\", weight = 10001 }]\n",
        3,
        "routes[0].split[0].weight",
        "must be between 0 and 10000, got 10001",
    ),
    (
        "split with every weight 0",
        "[[routes]]\nname = \"r\"\nsplit = [{ cluster = \"tail\", weight = 0 }]\n",
        3,
        "routes[0].split",
        "every weight is 0",
    ),
    (
        "split naming a cluster twice",
        "[[routes]]\nname = \"r\"\nsplit = [{ cluster = \"tail\", weight = 1 }, { cluster = \"tail\", weight = 2 }]\n",
        3,
        "routes[0].split[1].cluster",
        "already a side of this split",
    ),
    (
        "empty split",
        "[[routes]]\nname = \"r\"\nsplit = []\n",
        3,
        "routes[0].split",
        "empty: name at least one cluster",
    ),
    (
        "split_sticky without split",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\nsplit_sticky = \"cookie\"\n",
        4,
        "routes[0].split_sticky",
        "only used with `split`",
    ),
    (
        "unknown split_sticky",
        "[[routes]]\nname = \"r\"\nsplit = [{ cluster = \"tail\", weight = 1 }]\nsplit_sticky = \"session\"\n",
        4,
        "routes[0].split_sticky",
        "expected \"cookie\", \"client_ip\" or \"header:<name>\"",
    ),
    (
        "split_sticky on a bad header name",
        "[[routes]]\nname = \"r\"\nsplit = [{ cluster = \"tail\", weight = 1 }]\nsplit_sticky = \"header:x user\"\n",
        4,
        "routes[0].split_sticky",
        "invalid header name \"x user\"",
    ),
    (
        "sticky cookie name not a token",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.sticky]\ncookie = \"my srv\"\n",
        6,
        "clusters[0].sticky.cookie",
        "invalid cookie name \"my srv\"",
    ),
    (
        "sticky max_age zero",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.sticky]\nmax_age = \"0s\"\n",
        6,
        "clusters[0].sticky.max_age",
        "",
    ),
    (
        "unknown sticky key",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.sticky]\nhttponly = true\n",
        6,
        "clusters[0].sticky.httponly",
        "unknown field",
    ),
    (
        "route on unknown listener",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\nlisteners = [\"tail\", \"nope\"]\n",
        4,
        "routes[0].listeners[1]",
        "unknown listener \"nope\"",
    ),
    (
        "duplicate route name",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes]]\nname = \"r\"\ncluster = \"tail\"\n",
        5,
        "routes[1].name",
        "duplicate route name \"r\" (first defined on line 2)",
    ),
    (
        "invalid regex",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[routes.match]\npath_regex = \"^/(a\"\n",
        5,
        "routes[0].match.path_regex",
        "invalid regex: unclosed group",
    ),
    (
        "two path conditions",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[routes.match]\npath_prefix = \"/a\"\npath_exact = \"/b\"\n",
        6,
        "routes[0].match.path_exact",
        "only one of path_prefix, path_exact, path_regex",
    ),
    (
        "path without leading slash",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[routes.match]\npath_prefix = \"api\"\n",
        5,
        "routes[0].match.path_prefix",
        "must start with '/'",
    ),
    (
        "lower-case method",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[routes.match]\nmethods = [\"GET\", \"post\"]\n",
        5,
        "routes[0].match.methods[1]",
        "invalid method \"post\" (methods are case-sensitive: \"POST\")",
    ),
    (
        "invalid header name",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[routes.match]\nheaders = [{ name = \"x canary\" }]\n",
        5,
        "routes[0].match.headers[0].name",
        "invalid header name \"x canary\"",
    ),
    (
        "host pattern with a port",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[routes.match]\nhosts = [\"api.example.com:8080\"]\n",
        5,
        "routes[0].match.hosts[0]",
        "ports are not part of a host pattern",
    ),
    (
        "strip_prefix without path_prefix",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[routes.rewrite]\nstrip_prefix = true\n",
        5,
        "routes[0].rewrite.strip_prefix",
        "needs the route to match with path_prefix",
    ),
    (
        "two rewrites",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[routes.rewrite]\nreplace_path = \"/x\"\nreplace_prefix = \"/y\"\n",
        6,
        "routes[0].rewrite.replace_prefix",
        "only one of strip_prefix, replace_prefix, replace_path",
    ),
    (
        "empty route listener list",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\nlisteners = []\n",
        4,
        "routes[0].listeners",
        "omit the key",
    ),
    (
        "duplicate cluster name",
        "[[clusters]]\nname = \"tail\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n",
        11,
        "clusters[1].name",
        "duplicate cluster name \"tail\" (first defined on line 2)",
    ),
    (
        "endpoint host name",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"example.com:80\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:2\"\n",
        4,
        "clusters[0].endpoints[0].address",
        "invalid address \"example.com:80\": expected ip:port, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\"; to resolve a DNS name, write dns = \"example.com:80\"",
    ),
    (
        "dns endpoint that is an IP",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\ndns = \"127.0.0.1:80\"\n",
        4,
        "clusters[0].endpoints[0].dns",
        "is an IP address, not a name; write address = \"127.0.0.1:80\"",
    ),
    (
        "dns endpoint without port",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\ndns = \"web.internal\"\n",
        4,
        "clusters[0].endpoints[0].dns",
        "expected name:port",
    ),
    (
        "dns endpoint with a bad name",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\ndns = \"web..internal:80\"\n",
        4,
        "clusters[0].endpoints[0].dns",
        "invalid DNS endpoint",
    ),
    (
        "address and dns in one endpoint",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\ndns = \"web.internal:80\"\n",
        5,
        "clusters[0].endpoints[0].dns",
        "`address` and `dns` in one endpoint",
    ),
    (
        "srv name with a port",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\nsrv = \"_http._tcp.web:80\"\n",
        4,
        "clusters[0].endpoints[0].srv",
        "invalid SRV name",
    ),
    (
        "weight on an srv endpoint",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\nsrv = \"_http._tcp.web\"\nweight = 5\n",
        5,
        "clusters[0].endpoints[0].weight",
        "not used with `srv`: the SRV record sets it",
    ),
    (
        "backup on a file endpoint",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\nfile = \"eps.json\"\nbackup = true\n",
        5,
        "clusters[0].endpoints[0].backup",
        "not used with `file`",
    ),
    (
        "empty endpoints file name",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\nfile = \"\"\n",
        4,
        "clusters[0].endpoints[0].file",
        "must not be empty",
    ),
    (
        "same dns source twice",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\ndns = \"web.internal:80\"\n[[clusters.endpoints]]\ndns = \"web.internal:80\"\n",
        6,
        "clusters[0].endpoints[1]",
        "duplicate endpoint source dns:web.internal:80 in cluster (first on line 4)",
    ),
    (
        "discovery without a dynamic source",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.discovery]\nttl_min = \"1s\"\n",
        5,
        "clusters[0].discovery",
        "only used with `dns`, `srv` or `file` endpoints",
    ),
    (
        "discovery ttl_min above ttl_max",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\ndns = \"web.internal:80\"\n[clusters.discovery]\nttl_min = \"10s\"\nttl_max = \"5s\"\n",
        7,
        "clusters[0].discovery.ttl_max",
        "ttl_min (10s) is above ttl_max (5s)",
    ),
    (
        "discovery resolver that is a name",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\ndns = \"web.internal:80\"\n[clusters.discovery]\nresolver = \"ns1.internal:53\"\n",
        6,
        "clusters[0].discovery.resolver",
        "invalid address \"ns1.internal:53\": expected ip:port",
    ),
    (
        "discovery retry of 0",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\ndns = \"web.internal:80\"\n[clusters.discovery]\nretry = \"0s\"\n",
        6,
        "clusters[0].discovery.retry",
        "must be greater than 0",
    ),
    (
        "discovery query_timeout that is no duration",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\ndns = \"web.internal:80\"\n[clusters.discovery]\nquery_timeout = \"soon\"\n",
        6,
        "clusters[0].discovery.query_timeout",
        "invalid duration \"soon\"",
    ),
    (
        "unknown discovery key",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\ndns = \"web.internal:80\"\n[clusters.discovery]\nrefresh = \"1s\"\n",
        6,
        "clusters[0].discovery.refresh",
        "unknown field `refresh`",
    ),
    (
        "endpoint port 0",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:0\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:2\"\n",
        4,
        "clusters[0].endpoints[0].address",
        "port 0",
    ),
    (
        "endpoint without address",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\nweight = 2\n",
        3,
        "clusters[0].endpoints[0].address",
        "missing field `address`",
    ),
    (
        "endpoint weight of the wrong type",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\nweight = 1.5\n",
        5,
        "clusters[0].endpoints[0].weight",
        "invalid type: floating point",
    ),
    (
        "weight 0",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\nweight = 0\n",
        5,
        "clusters[0].endpoints[0].weight",
        "must be between 1 and 1000, got 0",
    ),
    (
        "duplicate endpoint",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n",
        6,
        "clusters[0].endpoints[1].address",
        "duplicate endpoint 127.0.0.1:1 in cluster (first on line 4)",
    ),
    (
        "only backup endpoints",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\nbackup = true\n",
        3,
        "clusters[0].endpoints",
        "no primary endpoint",
    ),
    (
        "no endpoints at all",
        "[[clusters]]\nname = \"c\"\npolicy = \"random\"\n",
        1,
        "clusters[0].endpoints",
        "no primary endpoint",
    ),
    (
        "header_hash without hash_header",
        "[[clusters]]\nname = \"c\"\npolicy = \"header_hash\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n",
        3,
        "clusters[0].hash_header",
        "needs hash_header",
    ),
    (
        "hash_header with another policy",
        "[[clusters]]\nname = \"c\"\nhash_header = \"x-user\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n",
        3,
        "clusters[0].hash_header",
        "only used with policy = \"header_hash\"",
    ),
    (
        "bad maglev hash key",
        "[[clusters]]\nname = \"c\"\npolicy = \"maglev\"\nhash_key = \"src\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n",
        4,
        "clusters[0].hash_key",
        "unknown hash key \"src\"",
    ),
    (
        "zero health interval",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.health_check]\ninterval = \"0ms\"\ntimeout = \"1ms\"\n",
        6,
        "clusters[0].health_check.interval",
        "greater than 0",
    ),
    (
        "health timeout not below interval",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.health_check]\ninterval = \"2s\"\ntimeout = \"2s\"\n",
        7,
        "clusters[0].health_check.timeout",
        "must be less than interval",
    ),
    (
        "zero threshold",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.health_check]\nhealthy_threshold = 0\n",
        6,
        "clusters[0].health_check.healthy_threshold",
        "got 0",
    ),
    (
        "inverted status range",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.health_check]\nexpected_status = \"400-200\"\n",
        6,
        "clusters[0].health_check.expected_status",
        "400 is above 200",
    ),
    (
        "status out of range",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.health_check]\nexpected_status = 99\n",
        6,
        "clusters[0].health_check.expected_status",
        "status 99 is not between 100 and 599",
    ),
    (
        "http-only key on a tcp check",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.health_check]\nkind = \"tcp\"\npath = \"/x\"\n",
        7,
        "clusters[0].health_check.path",
        "only used with kind = \"http\"",
    ),
    (
        "bad duration unit",
        "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n[clusters.timeouts]\nconnect = \"5sec\"\n",
        6,
        "clusters[0].timeouts.connect",
        "unknown unit \"sec\"",
    ),
    (
        "vip without interfaces",
        "[[l4.vips]]\nname = \"v\"\ninterfaces = []\naddress = \"10.0.0.1:80\"\ncluster = \"tail\"\n",
        3,
        "l4.vips[0].interfaces",
        "at least one interface",
    ),
    (
        "vip to unknown cluster",
        "[[l4.vips]]\nname = \"v\"\ninterfaces = [\"eth0\"]\naddress = \"10.0.0.1:80\"\ncluster = \"nope\"\n",
        5,
        "l4.vips[0].cluster",
        "unknown cluster \"nope\"",
    ),
    (
        "duplicate vip name",
        "[[l4.vips]]\nname = \"v\"\ninterfaces = [\"eth0\"]\naddress = \"10.0.0.1:80\"\ncluster = \"tail\"\n[[l4.vips]]\nname = \"v\"\ninterfaces = [\"eth0\"]\naddress = \"10.0.0.2:80\"\ncluster = \"tail\"\n",
        7,
        "l4.vips[1].name",
        "duplicate vip name \"v\" (first defined on line 2)",
    ),
    (
        "bad vip mode",
        "[[l4.vips]]\nname = \"v\"\ninterfaces = [\"eth0\"]\naddress = \"10.0.0.1:80\"\nmode = \"nat\"\ncluster = \"tail\"\n",
        5,
        "l4.vips[0].mode",
        "expected one of \"dsr-l2\", \"ipip\"",
    ),
    (
        "unknown key under l4",
        "[l4]\nvip = []\n",
        2,
        "l4.vip",
        "unknown key; expected `vips`",
    ),
    (
        "filter with two kinds",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrequest_id = {}\naccess = { allow = [\"10.0.0.0/8\"] }\n",
        4,
        "routes[0].filters[0]",
        "this one sets request_id, access",
    ),
    (
        "filter with no kind",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\n",
        4,
        "routes[0].filters[0]",
        "needs exactly one of",
    ),
    (
        "bad path_rewrite regex",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\npath_rewrite = { regex = \"^/(a\", replacement = \"/b\" }\n",
        5,
        "routes[0].filters[0].path_rewrite.regex",
        "invalid regex",
    ),
    (
        "path_rewrite names a missing group",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\npath_rewrite = { regex = \"^/a/(.*)$\", replacement = \"/b/$2\" }\n",
        5,
        "routes[0].filters[0].path_rewrite.replacement",
        "$2 names no capture group",
    ),
    (
        "bad header name in request_headers",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrequest_headers = { set = [{ name = \"x bad\", value = \"1\" }] }\n",
        5,
        "routes[0].filters[0].request_headers.set[0].name",
        "invalid header name",
    ),
    (
        "managed header in response_headers",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nresponse_headers = { remove = [\"content-length\"] }\n",
        5,
        "routes[0].filters[0].response_headers.remove[0]",
        "managed by lbd",
    ),
    (
        "unknown template variable",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrequest_headers = { add = [{ name = \"x-a\", value = \"${client}\" }] }\n",
        5,
        "routes[0].filters[0].request_headers.add[0].value",
        "unknown variable ${client}",
    ),
    (
        "capture without path_regex",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrequest_headers = { add = [{ name = \"x-a\", value = \"${capture.1}\" }] }\n",
        4,
        "routes[0].filters[0]",
        "needs the route to match with match.path_regex",
    ),
    (
        "redirect status",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nredirect = { status = 200, scheme = \"https\" }\n",
        5,
        "routes[0].filters[0].redirect.status",
        "must be one of 301",
    ),
    (
        "access with host bits",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\naccess = { deny = [\"10.1.2.3/8\"] }\n",
        5,
        "routes[0].filters[0].access.deny[0]",
        "host bits set",
    ),
    (
        "direct_response body file missing",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\ndirect_response = { status = 503, body_file = \"/nonexistent/lbd-maint.html\" }\n",
        5,
        "routes[0].filters[0].direct_response.body_file",
        "cannot read /nonexistent/lbd-maint.html",
    ),
    (
        "rate_limit bad rate",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrate_limit = { limits = [{ rate = \"100 per second\" }] }\n",
        5,
        "routes[0].filters[0].rate_limit.limits[0].rate",
        "write N/period",
    ),
    (
        "rate_limit unknown key",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrate_limit = { key = \"cookie:x\", limits = [{ rate = \"1/s\" }] }\n",
        5,
        "routes[0].filters[0].rate_limit.key",
        "expected \"client_ip\"",
    ),
    (
        "rate_limit no limits",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrate_limit = { limits = [] }\n",
        5,
        "routes[0].filters[0].rate_limit.limits",
        "give 1 to 4 limits",
    ),
    (
        "rate_limit redis bad scheme",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrate_limit = { limits = [{ rate = \"1/s\" }], redis = { url = \"http://127.0.0.1:6379\" } }\n",
        5,
        "routes[0].filters[0].rate_limit.redis.url",
        "expected a redis:// or rediss:// URL",
    ),
    (
        "rate_limit redis bad url",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrate_limit = { limits = [{ rate = \"1/s\" }], redis = { url = \"redis://127.0.0.1:notaport\" } }\n",
        5,
        "routes[0].filters[0].rate_limit.redis.url",
        "invalid Redis URL",
    ),
    (
        "rate_limit redis zero timeout",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrate_limit = { limits = [{ rate = \"1/s\" }], redis = { url = \"redis://127.0.0.1:6379\", timeout = \"0s\" } }\n",
        5,
        "routes[0].filters[0].rate_limit.redis.timeout",
        "must be greater than 0",
    ),
    (
        "rate_limit redis long timeout",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrate_limit = { limits = [{ rate = \"1/s\" }], redis = { url = \"redis://127.0.0.1:6379\", timeout = \"2s\" } }\n",
        5,
        "routes[0].filters[0].rate_limit.redis.timeout",
        "at most 1s",
    ),
    (
        "rate_limit redis bad failure mode",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrate_limit = { limits = [{ rate = \"1/s\" }], redis = { url = \"redis://127.0.0.1:6379\", failure_mode = \"open\" } }\n",
        5,
        "routes[0].filters[0].rate_limit.redis.failure_mode",
        "expected one of",
    ),
    (
        "rate_limit redis bad batch",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrate_limit = { limits = [{ rate = \"1/s\" }], redis = { url = \"redis://127.0.0.1:6379\", batch = -1 } }\n",
        5,
        "routes[0].filters[0].rate_limit.redis.batch",
        "must be between 0 and 10000",
    ),
    (
        "rate_limit redis missing password file",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrate_limit = { limits = [{ rate = \"1/s\" }], redis = { url = \"redis://127.0.0.1:6379\", password_file = \"/nonexistent/redis-pass\" } }\n",
        5,
        "routes[0].filters[0].rate_limit.redis.password_file",
        "cannot read /nonexistent/redis-pass",
    ),
    (
        "rate_limit redis ca_file without tls",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrate_limit = { limits = [{ rate = \"1/s\" }], redis = { url = \"redis://127.0.0.1:6379\", ca_file = \"/nonexistent/ca.pem\" } }\n",
        5,
        "routes[0].filters[0].rate_limit.redis.ca_file",
        "ca_file needs a rediss:// URL",
    ),
    (
        "rate_limit redis bad prefix",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrate_limit = { limits = [{ rate = \"1/s\" }], redis = { url = \"redis://127.0.0.1:6379\", prefix = \"a b\" } }\n",
        5,
        "routes[0].filters[0].rate_limit.redis.prefix",
        "no spaces",
    ),
    (
        "rate_limit empty claim key",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nrate_limit = { key = \"claim:\", limits = [{ rate = \"1/s\" }] }\n",
        5,
        "routes[0].filters[0].rate_limit.key",
        "claim:<name> needs a claim name",
    ),
    (
        "cors wildcard origin with credentials",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\n[routes.filters.cors]\nallow_origins = [\"https://a.example\",\n  \"*\"]\nallow_credentials = true\n",
        7,
        "routes[0].filters[0].cors.allow_origins[1]",
        "cannot be used with allow_credentials = true",
    ),
    (
        "cors bad header name",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\ncors = { allow_origins = [\"https://a.example\"], allow_headers = [\"x bad\"] }\n",
        5,
        "routes[0].filters[0].cors.allow_headers[0]",
        "invalid header name",
    ),
    (
        "cors bad method token",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\ncors = { allow_origins = [\"https://a.example\"], allow_methods = [\"GE T\"] }\n",
        5,
        "routes[0].filters[0].cors.allow_methods[0]",
        "invalid method token",
    ),
    (
        "cors lower-case method",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\ncors = { allow_origins = [\"https://a.example\"], allow_methods = [\"put\"] }\n",
        5,
        "routes[0].filters[0].cors.allow_methods[0]",
        "write \"PUT\"",
    ),
    (
        "cors origin with a path",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\ncors = { allow_origins = [\"https://a.example/app\"] }\n",
        5,
        "routes[0].filters[0].cors.allow_origins[0]",
        "an origin has no path",
    ),
    (
        "cors wildcard inside a host",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\ncors = { allow_origins = [\"https://a.*.example\"] }\n",
        5,
        "routes[0].filters[0].cors.allow_origins[0]",
        "allowed alone or as the first label",
    ),
    (
        "cors without origins",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\ncors = { allow_methods = [\"GET\"] }\n",
        5,
        "routes[0].filters[0].cors.allow_origins",
        "list at least one origin",
    ),
    (
        "cors max_age over a day",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\ncors = { allow_origins = [\"*\"], max_age = \"48h\" }\n",
        5,
        "routes[0].filters[0].cors.max_age",
        "at most 24h",
    ),
    (
        "jwt algorithm none",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\njwt = { providers = [{ name = \"a\", issuer = \"i\", algorithms = [\"none\"], jwks_url = \"http://127.0.0.1:1/k\" }] }\n",
        5,
        "routes[0].filters[0].jwt.providers[0].algorithms[0]",
        "never accepted",
    ),
    (
        "jwt without an algorithm allow-list",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\njwt = { providers = [{ name = \"a\", issuer = \"i\", jwks_url = \"http://127.0.0.1:1/k\" }] }\n",
        5,
        "routes[0].filters[0].jwt.providers[0]",
        "explicit allow-list",
    ),
    (
        "jwt cache_size negative",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\njwt = { providers = [{ name = \"a\", issuer = \"i\", algorithms = [\"ES256\"], jwks_url = \"http://127.0.0.1:1/k\" }], cache_size = -1 }\n",
        5,
        "routes[0].filters[0].jwt.cache_size",
        "must be between 0 and 1048576, got -1",
    ),
    (
        "jwt cache_size above the bound",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\njwt = { providers = [{ name = \"a\", issuer = \"i\", algorithms = [\"ES256\"], jwks_url = \"http://127.0.0.1:1/k\" }], cache_size = 2000000 }\n",
        5,
        "routes[0].filters[0].jwt.cache_size",
        "must be between 0 and 1048576, got 2000000",
    ),
    (
        "jwt key-set CA with a cleartext URL",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\njwt = { providers = [{ name = \"a\", issuer = \"i\", algorithms = [\"ES256\"], jwks_url = \"http://id.example/k\", jwks_ca = \"ca.pem\" }] }\n",
        5,
        "routes[0].filters[0].jwt.providers[0].jwks_ca",
        "only used with an https",
    ),
    (
        "jwt key-set CA file missing",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\njwt = { providers = [{ name = \"a\", issuer = \"i\", algorithms = [\"ES256\"], jwks_url = \"https://id.example/k\", jwks_ca = \"/nonexistent/ca.pem\" }] }\n",
        5,
        "routes[0].filters[0].jwt.providers[0].jwks_ca",
        "cannot read",
    ),
    (
        "jwt key-set URL of another scheme",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\njwt = { providers = [{ name = \"a\", issuer = \"i\", algorithms = [\"ES256\"], jwks_url = \"ftp://id.example/k\" }] }\n",
        5,
        "routes[0].filters[0].jwt.providers[0].jwks_url",
        "expected http(s)://",
    ),
    (
        "jwt HS256 without a secret",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\njwt = { providers = [{ name = \"a\", issuer = \"i\", algorithms = [\"HS256\"] }] }\n",
        5,
        "routes[0].filters[0].jwt.providers[0]",
        "need secret_file",
    ),
    (
        "jwt key set file missing",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\njwt = { providers = [{ name = \"a\", issuer = \"i\", algorithms = [\"RS256\"], jwks_file = \"/nonexistent/lbd-jwks.json\" }] }\n",
        5,
        "routes[0].filters[0].jwt.providers[0].jwks_file",
        "cannot read /nonexistent/lbd-jwks.json",
    ),
    (
        "api_key hash not hex",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\napi_key = { keys = [{ consumer = \"a\", sha256 = \"abc\" }] }\n",
        5,
        "routes[0].filters[0].api_key.keys[0].sha256",
        "64 hex digits",
    ),
    (
        "mirror to an unknown cluster",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nmirror = { cluster = \"nope\" }\n",
        5,
        "routes[0].filters[0].mirror.cluster",
        "unknown cluster \"nope\"",
    ),
    (
        "mirror percent out of range",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nmirror = { cluster = \"tail\", percent = 150.0 }\n",
        5,
        "routes[0].filters[0].mirror.percent",
        "must be between 0 and 100",
    ),
    (
        "mirror max_in_flight zero",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nmirror = { cluster = \"tail\", max_in_flight = 0 }\n",
        5,
        "routes[0].filters[0].mirror.max_in_flight",
        "must be between 1 and 1000000",
    ),
    (
        "two mirrors on one route",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nmirror = { cluster = \"tail\" }\n[[routes.filters]]\nmirror = { cluster = \"tail\", percent = 5 }\n",
        6,
        "routes[0].filters[1]",
        "one mirror per route",
    ),
    (
        "xml_json direction misspelt",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nxml_json = { request = \"xml2json\" }\n",
        5,
        "routes[0].filters[0].xml_json.request",
        "unknown value \"xml2json\"; expected one of \"off\", \"xml_to_json\", \"json_to_xml\"",
    ),
    (
        "xml_json without a direction",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nxml_json = { max_body_bytes = 10 }\n",
        5,
        "routes[0].filters[0].xml_json",
        "xml_json needs request and/or response",
    ),
    (
        "xml_json max_body_bytes zero",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nxml_json = { response = \"xml_to_json\", max_body_bytes = 0 }\n",
        5,
        "routes[0].filters[0].xml_json.max_body_bytes",
        "must be between 1 and 67108864, got 0",
    ),
    (
        "xml_json root not an element name",
        "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\nxml_json = { request = \"json_to_xml\",\n  root = \"1st\" }\n",
        6,
        "routes[0].filters[0].xml_json.root",
        "\"1st\" is not an XML element name",
    ),
    (
        "unreadable certificate file",
        "[[listeners]]\nname = \"s\"\nbind = \"127.0.0.1:0\"\n[listeners.tls]\n[[listeners.tls.certificates]]\ncert = \"/nonexistent/lbd.crt\"\nkey = \"/nonexistent/lbd.key\"\n",
        6,
        "listeners[0].tls.certificates[0].cert",
        "cannot read /nonexistent/lbd.crt",
    ),
    (
        "TLS listener without certificates",
        "[[listeners]]\nname = \"s\"\nbind = \"127.0.0.1:0\"\n[listeners.tls]\nmin_version = \"1.3\"\n",
        4,
        "listeners[0].tls.certificates",
        "needs at least one",
    ),
];

#[test]
fn jwks_file_with_a_broken_key_names_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("lbd-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let b64 = |b: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    let cases = [
        (
            "off-curve.json",
            format!(
                r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"bad","x":"{}","y":"{}"}}]}}"#,
                b64(&[1; 32]),
                b64(&[1; 32])
            ),
            "keys[0] (kid \"bad\"): invalid key: not a point on the curve",
        ),
        (
            "short-rsa.json",
            format!(
                r#"{{"keys":[{{"kty":"RSA","kid":"small","n":"{}","e":"AQAB"}}]}}"#,
                b64(&[0xff; 64])
            ),
            "keys[0] (kid \"small\"): RSA modulus of 512 bits",
        ),
        (
            "bad-base64.json",
            r#"{"keys":[{"kty":"RSA","n":"!!!","e":"AQAB"}]}"#.to_owned(),
            "keys[0]: invalid RSA modulus",
        ),
        (
            "secret.json",
            r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#.to_owned(),
            "use secret_file",
        ),
        ("not-json.json", "{ keys: ".to_owned(), "not JSON"),
    ];
    for (name, text, want) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        let config = format!(
            "[[routes]]\nname = \"r\"\ncluster = \"tail\"\n[[routes.filters]]\njwt = {{ providers = [{{ name = \"a\", issuer = \"i\", algorithms = [\"RS256\", \"ES256\"], jwks_file = \"{}\" }}] }}\n{OK_TAIL}",
            path.display()
        );
        let errs = errors(&config);
        assert_eq!(errs.len(), 1, "{name}: {errs:#?}");
        let e = errs[0].to_string();
        let at = format!(
            "t.toml:5:{}: routes[0].filters[0].jwt.providers[0].jwks_file: {}: ",
            errs[0].column,
            path.display()
        );
        assert!(e.starts_with(&at), "{name}: {e}");
        assert!(e.contains(want), "{name}: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `[tracing]` is off without the table; with it, the defaults are the OTLP SDK's.
#[test]
fn tracing_is_off_by_default_and_takes_its_defaults() {
    let off = parse(OK_TAIL, Path::new("t.toml")).expect("valid");
    assert!(off.global.tracing.is_none());
    let on = parse(
        &format!("[tracing]\nendpoint = \"http://127.0.0.1:4318\"\nprotocol = \"http/protobuf\"\n{OK_TAIL}"),
        Path::new("t.toml"),
    )
    .expect("valid");
    let t = on.global.tracing.expect("on");
    assert_eq!(t.endpoint.to_string(), "http://127.0.0.1:4318/v1/traces");
    assert_eq!(t.protocol, lbd::config::otlp::Protocol::HttpProtobuf);
    assert_eq!(t.sample_ratio, 1.0);
    assert_eq!(t.service_name, "lbd");
    assert_eq!((t.queue_size, t.batch_size), (2048, 512));
    assert_eq!(t.flush_interval, Duration::from_secs(5));
    assert_eq!(t.timeout, Duration::from_secs(10));

    // The commented-out `[tracing]` of configs/lb.toml, uncommented, writes out the defaults.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/lb.toml");
    let example = std::fs::read_to_string(path).expect("configs/lb.toml");
    let block: String = example
        .lines()
        .skip_while(|l| *l != "# [tracing]")
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| {
            l.starts_with('[') || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(block.lines().count(), 9, "{block}");
    let documented = parse(&format!("{block}{OK_TAIL}"), Path::new("t.toml"))
        .expect("documented [tracing]")
        .global
        .tracing
        .expect("on");
    assert_eq!(documented.endpoint.to_string(), "http://127.0.0.1:4317/");
    assert_eq!(documented.protocol, lbd::config::otlp::Protocol::Grpc);
    assert_eq!(
        (documented.sample_ratio, documented.service_name.as_str()),
        (t.sample_ratio, t.service_name.as_str())
    );
    assert_eq!(
        (documented.queue_size, documented.batch_size),
        (t.queue_size, t.batch_size)
    );
    assert_eq!(
        (documented.flush_interval, documented.timeout),
        (t.flush_interval, t.timeout)
    );
}

#[test]
fn each_broken_config_reports_line_key_and_message() {
    let mut failures = Vec::new();
    for &(what, text, line, key, msg) in CASES {
        // The tail makes the rest of the file valid; cases that need nothing to serve skip it.
        let full = if what == "nothing to serve" || what == "TOML syntax error" {
            text.to_string()
        } else {
            format!("{text}{OK_TAIL}")
        };
        let errs = match parse(&full, Path::new("t.toml")) {
            Ok(_) => {
                failures.push(format!("{what}: accepted"));
                continue;
            }
            Err(e) => e.0,
        };
        let ok = errs.len() == 1
            && errs[0].line == line
            && errs[0].key == key
            && errs[0].message.contains(msg)
            && errs[0].column >= 1;
        if !ok {
            let got: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            failures.push(format!(
                "{what}: want one error {line}: {key}: ..{msg}..\n  got:\n    {}",
                got.join("\n    ")
            ));
        }
    }
    assert!(CASES.len() >= 20);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn error_display_is_file_line_column_key_message() {
    let errs = errors(
        "[global]\nlog_format = \"xml\"\n[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n",
    );
    assert_eq!(
        errs[0].to_string(),
        "t.toml:2:14: global.log_format: unknown value \"xml\"; expected one of \"text\", \"json\""
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"[global]
drain_timeout = "5"

[[listeners]]
name = "a"
bind = "127.0.0.1:80"
typo = true

[[listeners]]
name = "b"
bind = "nope"

[[routes]]
name = "r"
cluster = "missing"
[routes.match]
methods = ["FETCH"]

[[clusters]]
name = "c"
[[clusters.endpoints]]
address = "127.0.0.1:1"
weight = 5000
"#;
    let errs = errors(text);
    let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (2, "global.drain_timeout"),
            (7, "listeners[0].typo"),
            (11, "listeners[1].bind"),
            (15, "routes[0].cluster"),
            (17, "routes[0].match.methods[0]"),
            (23, "clusters[0].endpoints[0].weight"),
        ],
        "{errs:#?}"
    );
}

#[test]
fn unreadable_cluster_does_not_cause_unknown_reference_noise() {
    // The second cluster has a typo; the route naming it must not also be reported.
    let text = r#"[[listeners]]
name = "a"
bind = "127.0.0.1:80"

[[clusters]]
name = "c"
[[clusters.endpoints]]
address = "127.0.0.1:1"

[[clusters]]
name = "d"
polcy = "random"
[[clusters.endpoints]]
address = "127.0.0.1:2"

[[routes]]
name = "r"
cluster = "d"
"#;
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(
        (errs[0].line, errs[0].key.as_str()),
        (12, "clusters[1].polcy")
    );
}

const FULL: &str = r#"
[global]
log_format = "json"
log_level = "debug"
access_log = false
drain_timeout = "1m30s"
workers = 3

[admin]
token = "s3cret"

[[listeners]]
name = "a"
bind = "127.0.0.1:8080"

[[listeners]]
name = "b"
bind = "[::1]:8081"
protocol = "h2c"
[listeners.limits]
max_connections = 5
max_body_bytes = 1048576
header_read_timeout = "250ms"

[[routes]]
name = "low"
cluster = "web"

[[routes]]
name = "high"
cluster = "api"
listeners = ["b"]
priority = 10
timeout = "3s"
[routes.match]
hosts = ["API.example.com", "*.example.com"]
path_prefix = "/api"
methods = ["GET", "HEAD"]
headers = [{ name = "X-Canary", value = "1" }, { name = "x-present" }]
query = [{ name = "v", value = "2" }]
[routes.rewrite]
strip_prefix = true

[[routes]]
name = "low2"
cluster = "web"
[routes.match]
path_regex = "^/x/[0-9]+$"
[routes.rewrite]
replace_path = "/y"

[[routes]]
name = "high2"
cluster = "web"
priority = 10
[routes.match]
path_exact = "/exact"

[[clusters]]
name = "web"
[[clusters.endpoints]]
address = "127.0.0.1:9001"

[[clusters]]
name = "api"
policy = "maglev"
hash_key = "header:X-User"
protocol = "http2"
[[clusters.endpoints]]
address = "127.0.0.1:9002"
weight = 7
[[clusters.endpoints]]
address = "127.0.0.1:9003"
backup = true
[clusters.health_check]
kind = "http"
expected_status = "204"
interval = "10s"
[clusters.passive]
max_fails = 0
[clusters.pool]
max_connections = 8
[clusters.retry]
attempts = 0

[[l4.vips]]
name = "v"
interfaces = ["eth0", "eth1"]
address = "10.0.0.1:53"
protocol = "udp"
mode = "ipip"
hash = "source"
cluster = "api"
"#;

#[test]
fn full_config_builds_the_expected_model() {
    let m = parse(FULL, Path::new("full.toml")).unwrap_or_else(|e| panic!("{e}"));

    assert_eq!(m.source.path, Path::new("full.toml"));
    assert_eq!(m.source.hash.len(), 16);
    assert!(m.source.hash.bytes().all(|b| b.is_ascii_hexdigit()));
    let again = parse(FULL, Path::new("other.toml")).expect("parses");
    assert_eq!(
        m.source.hash, again.source.hash,
        "hash depends only on the bytes"
    );
    let changed = parse(&FULL.replace("1m30s", "1m31s"), Path::new("x")).expect("parses");
    assert_ne!(m.source.hash, changed.source.hash);

    assert_eq!(m.global.log_format, LogFormat::Json);
    assert_eq!(m.global.log_level, "debug");
    assert!(!m.global.access_log);
    assert_eq!(m.global.drain_timeout, Duration::from_secs(90));
    assert_eq!(m.global.workers, Some(3));
    let admin = m.global.admin.as_ref().expect("admin enabled by its table");
    assert_eq!(
        admin.bind,
        "127.0.0.1:9901".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(admin.token.as_deref(), Some("s3cret"));

    assert_eq!(m.listeners.len(), 2);
    let a = &m.listeners[0];
    assert_eq!((a.name.as_str(), a.protocol), ("a", ListenerProtocol::Http));
    assert_eq!(
        a.limits,
        Limits {
            max_connections: 10_000,
            max_header_bytes: 65_536,
            max_body_bytes: 0,
            request_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
        }
    );
    let b = &m.listeners[1];
    assert_eq!(b.bind, "[::1]:8081".parse::<SocketAddr>().expect("addr"));
    assert_eq!(b.protocol, ListenerProtocol::H2c);
    assert_eq!(b.limits.max_connections, 5);
    assert_eq!(b.limits.max_body_bytes, 1_048_576);
    assert_eq!(b.limits.header_read_timeout, Duration::from_millis(250));
    assert_eq!(b.limits.idle_timeout, Duration::from_secs(60));

    // Priority descending, then declared order.
    let order: Vec<&str> = m.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(order, ["high", "high2", "low", "low2"]);
    let high = &m.routes[0];
    assert_eq!(high.cluster, 1);
    assert_eq!(high.listeners, [1]);
    assert_eq!(high.priority, 10);
    assert_eq!(high.timeout, Some(Duration::from_secs(3)));
    assert_eq!(
        high.matcher.hosts,
        [
            HostMatch::Exact("api.example.com".into()),
            HostMatch::Suffix(".example.com".into())
        ]
    );
    assert!(matches!(&high.matcher.path, Some(PathMatch::Prefix(p)) if p == "/api"));
    assert_eq!(
        high.matcher.methods,
        [http::Method::GET, http::Method::HEAD]
    );
    assert_eq!(high.matcher.headers.len(), 2);
    assert_eq!(high.matcher.headers[0].name.as_str(), "x-canary");
    assert_eq!(high.matcher.headers[0].value.as_deref(), Some("1"));
    assert_eq!(high.matcher.headers[1].value, None);
    assert_eq!(high.matcher.query[0].name, "v");
    assert_eq!(high.matcher.query[0].value.as_deref(), Some("2"));
    assert_eq!(high.rewrite, Some(PathRewrite::StripPrefix));
    let low = &m.routes[2];
    assert!(low.listeners.is_empty(), "no listeners key = all listeners");
    assert_eq!((low.cluster, low.priority, low.timeout), (0, 0, None));
    assert!(low.rewrite.is_none());
    let low2 = &m.routes[3];
    match &low2.matcher.path {
        Some(PathMatch::Regex(re)) => {
            assert!(re.is_match("/x/42"));
            assert!(!re.is_match("/x/y"));
        }
        other => panic!("want regex, got {other:?}"),
    }
    assert_eq!(low2.rewrite, Some(PathRewrite::ReplacePath("/y".into())));
    assert!(matches!(&m.routes[1].matcher.path, Some(PathMatch::Exact(p)) if p == "/exact"));

    let web = &m.clusters[0];
    assert_eq!(web.name, "web");
    assert_eq!(web.policy, Policy::RoundRobin);
    assert_eq!(web.protocol, UpstreamProtocol::Http1);
    assert!(web.health_check.is_none());
    assert_eq!(
        web.passive,
        Passive {
            max_fails: 1,
            fail_timeout: Duration::from_secs(10)
        }
    );
    assert_eq!(
        web.timeouts,
        UpstreamTimeouts {
            connect: Duration::from_secs(5),
            response: Duration::from_secs(60),
            idle: Duration::from_secs(90),
        }
    );
    assert_eq!(
        web.pool,
        PoolLimits {
            max_connections: 0,
            max_idle: 64
        }
    );
    assert_eq!(web.retry.attempts, 1);
    assert_eq!(
        web.endpoints,
        [Endpoint {
            address: "127.0.0.1:9001".parse().expect("addr"),
            weight: 1,
            backup: false,
            origin: lbd::config::discovery::Origin::Static,
            server_name: None,
        }]
    );

    let api = &m.clusters[1];
    assert_eq!(
        api.policy,
        Policy::Maglev(HashKey::Header(http::HeaderName::from_static("x-user")))
    );
    assert_eq!(api.protocol, UpstreamProtocol::Http2);
    assert_eq!(api.endpoints.len(), 2);
    assert_eq!(
        (api.endpoints[0].weight, api.endpoints[0].backup),
        (7, false)
    );
    assert_eq!(
        (api.endpoints[1].weight, api.endpoints[1].backup),
        (1, true)
    );
    assert_eq!(
        api.health_check,
        Some(HealthCheck {
            kind: HealthCheckKind::Http {
                path: "/".into(),
                host: None,
                expected: (204, 204)
            },
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            jitter: Duration::ZERO,
        })
    );
    assert_eq!(api.passive.max_fails, 0);
    assert_eq!(api.pool.max_connections, 8);
    assert_eq!(api.retry.attempts, 0);

    assert_eq!(m.vips.len(), 1);
    let v = &m.vips[0];
    assert_eq!(v.name, "v");
    assert_eq!(v.interfaces, ["eth0", "eth1"]);
    assert_eq!(
        v.address,
        "10.0.0.1:53".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(v.protocol, L4Protocol::Udp);
    assert_eq!(v.mode, ForwardMode::Ipip);
    assert!(v.source_hash_only);
    assert_eq!(v.cluster, 1);
}

#[test]
fn admin_is_off_without_its_table_and_defaults_with_it() {
    let base = "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:80\"\n";
    let m = parse(base, Path::new("t")).expect("valid");
    assert!(m.global.admin.is_none());
    assert_eq!(m.global.log_format, LogFormat::Text);
    assert_eq!(m.global.log_level, "info");
    assert!(m.global.access_log);
    assert_eq!(m.global.drain_timeout, Duration::from_secs(30));
    assert_eq!(m.global.workers, None, "one per CPU");
    let m = parse(&format!("[admin]\n{base}"), Path::new("t")).expect("valid");
    let admin = m.global.admin.expect("enabled");
    assert_eq!(
        admin.bind,
        "127.0.0.1:9901".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(admin.token, None);
}

#[test]
fn example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/lb.toml");
    let m = lbd::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.listeners.len(), 1);
    assert_eq!(
        m.listeners[0].bind,
        "127.0.0.1:8080".parse::<SocketAddr>().expect("addr")
    );
    assert_eq!(m.clusters.len(), 2);
    assert!(m.clusters.iter().all(|c| c.health_check.is_some()));
    // The [clusters.outlier] example writes out every default.
    assert!(
        m.clusters
            .iter()
            .any(|c| c.outlier == Some(Outlier::default()))
    );
    assert!(m.global.admin.is_some());
    assert!(m.routes.len() >= 2);
    assert!(m.vips.is_empty());
}

#[test]
fn grpc_cluster_defaults_to_least_request_and_takes_a_grpc_check() {
    let text = r#"
[[listeners]]
name = "l"
bind = "127.0.0.1:0"

[[clusters]]
name = "g"
protocol = "grpc"
[[clusters.endpoints]]
address = "127.0.0.1:50051"
[clusters.health_check]
kind = "grpc"
service = "helloworld.Greeter"
[clusters.retry]
grpc_status = ["unavailable", "resource_exhausted", "unavailable"]

[[clusters]]
name = "g2"
protocol = "grpc"
policy = "round_robin"
[[clusters.endpoints]]
address = "127.0.0.1:50052"
[clusters.health_check]
kind = "grpc"
"#;
    let m = parse(text, Path::new("g.toml")).unwrap_or_else(|e| panic!("{e}"));
    let (g, g2) = (&m.clusters[0], &m.clusters[1]);
    assert_eq!(g.protocol, UpstreamProtocol::Grpc);
    assert_eq!(g.policy, Policy::LeastRequest);
    assert_eq!(
        g.health_check.as_ref().map(|h| &h.kind),
        Some(&HealthCheckKind::Grpc {
            service: "helloworld.Greeter".into()
        })
    );
    assert_eq!(g.retry.grpc_status, vec![14, 8]);
    assert_eq!(g2.policy, Policy::RoundRobin);
    assert!(g2.retry.grpc_status.is_empty());
    assert_eq!(
        g2.health_check.as_ref().map(|h| &h.kind),
        Some(&HealthCheckKind::Grpc {
            service: String::new()
        })
    );
}

/// A listener with one certificate pair, for the file-based TLS checks below.
fn tls_config(cert: &Path, key: &Path, extra: &str) -> String {
    format!(
        "[[listeners]]\nname = \"s\"\nbind = \"127.0.0.1:0\"\n[listeners.tls]\n[[listeners.tls.certificates]]\ncert = {}\nkey = {}\n{extra}{OK_TAIL}",
        lb_tests::certs::toml_path(cert),
        lb_tests::certs::toml_path(key),
    )
}

/// Certificate files are read and checked when the config is loaded: each broken pair is
/// one error on its line, naming the file and what is wrong with it.
#[test]
fn tls_pairs_are_checked_when_the_config_is_loaded() {
    use lb_tests::certs::{LeafOpts, Pki};
    let pki = Pki::new("test CA");
    let opts = |names: &[&str]| LeafOpts {
        names: names.iter().map(|n| n.to_string()).collect(),
        cn: "leaf".into(),
        serial: 7,
        expired: false,
        key_pem: None,
    };
    let good = pki.leaf("good", &opts(&["a.test", "*.w.test"]));
    let other = pki.leaf("other", &opts(&["b.test"]));
    let expired = pki.leaf(
        "expired",
        &LeafOpts {
            expired: true,
            ..opts(&["a.test"])
        },
    );
    let empty = pki.write("empty.crt", b"# no PEM here\n");
    let reversed = pki.write(
        "reversed.crt",
        format!("{}{}", pki.ca_pem, good.cert_pem).as_bytes(),
    );

    let cases: Vec<(&str, String, usize, &str, String)> = vec![
        (
            "key of another certificate",
            tls_config(&good.cert, &other.key, ""),
            7,
            "listeners[0].tls.certificates[0].key",
            format!("does not match the certificate in {}", good.cert.display()),
        ),
        (
            "no certificate in the file",
            tls_config(&empty, &good.key, ""),
            6,
            "listeners[0].tls.certificates[0].cert",
            format!("no CERTIFICATE in {}", empty.display()),
        ),
        (
            "expired certificate",
            tls_config(&expired.cert, &expired.key, ""),
            6,
            "listeners[0].tls.certificates[0].cert",
            "expired at".to_string(),
        ),
        (
            "chain out of order",
            tls_config(&reversed, &good.key, ""),
            6,
            "listeners[0].tls.certificates[0].cert",
            "chain out of order".to_string(),
        ),
        (
            "a name the certificate does not cover",
            tls_config(&good.cert, &good.key, "names = [\"x.y.w.test\"]\n"),
            8,
            "listeners[0].tls.certificates[0].names[0]",
            "is not valid for \"x.y.w.test\"".to_string(),
        ),
        (
            "unknown ALPN protocol",
            tls_config(&good.cert, &good.key, "").replace(
                "[listeners.tls]\n[[listeners.tls.certificates]]",
                "[listeners.tls]\nalpn = [\"h3\"]\n[[listeners.tls.certificates]]",
            ),
            5,
            "listeners[0].tls.alpn[0]",
            "unknown protocol \"h3\"".to_string(),
        ),
        (
            "TLS 1.1 as the minimum",
            tls_config(&good.cert, &good.key, "").replace(
                "[listeners.tls]\n[[listeners.tls.certificates]]",
                "[listeners.tls]\nmin_version = \"1.1\"\n[[listeners.tls.certificates]]",
            ),
            5,
            "listeners[0].tls.min_version",
            "expected one of \"1.2\", \"1.3\"".to_string(),
        ),
        (
            "h2c on a TLS listener",
            tls_config(&good.cert, &good.key, "").replace(
                "bind = \"127.0.0.1:0\"\n[listeners.tls]",
                "bind = \"127.0.0.1:0\"\nprotocol = \"h2c\"\n[listeners.tls]",
            ),
            4,
            "listeners[0].protocol",
            "chosen by ALPN".to_string(),
        ),
        (
            "a key file without a key",
            tls_config(&good.cert, &good.cert, ""),
            7,
            "listeners[0].tls.certificates[0].key",
            "no private key in".to_string(),
        ),
    ];
    let mut failures = Vec::new();
    for (what, text, line, key, msg) in &cases {
        let errs = errors(text);
        let ok = errs.len() == 1
            && errs[0].line == *line
            && errs[0].key == *key
            && errs[0].message.contains(msg.as_str());
        if !ok {
            let got: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            failures.push(format!(
                "{what}: want {line}: {key}: ..{msg}..\n  got:\n    {}",
                got.join("\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // A good pair: names come from the certificate, the key is usable.
    let model = parse(&tls_config(&good.cert, &good.key, ""), Path::new("t.toml"))
        .expect("valid TLS config");
    let tls = model.listeners[0].tls.as_ref().expect("tls");
    assert_eq!(tls.certificates[0].names, ["a.test", "*.w.test"]);
    assert_eq!(tls.certificates[0].serial, "07");
    assert_eq!(tls.alpn, [b"h2".to_vec(), b"http/1.1".to_vec()]);
    assert!(tls.certificates[0].expires_in() > 0);
}

#[test]
fn retry_policies_budgets_and_breakers_build_the_expected_model() {
    let text = r#"
[[listeners]]
name = "l"
bind = "127.0.0.1:0"

[[routes]]
name = "plain"
cluster = "c"
match = { path_prefix = "/plain" }

[[routes]]
name = "own"
cluster = "c"
[routes.retry]
attempts = 3
retry_on = ["gateway_error", 429, "409"]
per_try_timeout = "250ms"
retry_non_idempotent = true
max_replay_bytes = 0
backoff_base = "10ms"

[[clusters]]
name = "c"
[[clusters.endpoints]]
address = "127.0.0.1:1"
[clusters.retry_budget]
ratio = 0.5
min_per_second = 0
window = "30s"
[clusters.circuit_breakers]
max_connections = 50
max_requests = 100
max_pending_requests = 20
max_retries = 3
"#;
    let m = parse(text, Path::new("r.toml")).unwrap_or_else(|e| panic!("{e}"));
    let c = &m.clusters[0];
    // Today's behaviour without a [clusters.retry]: one retry on connect failure or reset.
    assert_eq!(c.retry, Retry::default());
    assert_eq!(c.retry.attempts, 1);
    assert!(c.retry.on.connect_failure && c.retry.on.reset && !c.retry.on.any_status());
    assert_eq!(c.retry.max_replay_bytes, 65536);
    assert_eq!(
        c.retry_budget,
        RetryBudget {
            ratio: 0.5,
            min_per_second: 0,
            window: Duration::from_secs(30)
        }
    );
    assert_eq!(
        c.circuit_breakers,
        CircuitBreakers {
            max_connections: 50,
            max_requests: 100,
            max_pending_requests: 20,
            max_retries: 3
        }
    );
    let plain = m.routes.iter().find(|r| r.name == "plain").expect("plain");
    assert!(plain.retry.is_none());
    let own = m.routes.iter().find(|r| r.name == "own").expect("own");
    let r = own.retry.as_ref().expect("route policy");
    assert_eq!(r.attempts, 3);
    // A route's table replaces the cluster's: what it leaves out takes lbd's defaults.
    assert!(r.on.gateway_error && !r.on.connect_failure && !r.on.reset);
    assert_eq!(r.on.statuses, vec![429, 409]);
    assert_eq!(r.per_try_timeout, Some(Duration::from_millis(250)));
    assert!(r.non_idempotent);
    assert_eq!(r.max_replay_bytes, 0);
    assert_eq!(r.backoff_base, Duration::from_millis(10));
    assert_eq!(r.backoff_max, Duration::from_millis(100));
}

#[test]
fn outlier_table_takes_envoy_defaults_and_is_off_without_it() {
    let base = "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n[[clusters]]\nname = \"c\"\n\
                [[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n";
    let m = parse(base, Path::new("t.toml")).expect("valid");
    assert_eq!(m.clusters[0].outlier, None);

    let m = parse(&format!("{base}[clusters.outlier]\n"), Path::new("t.toml")).expect("valid");
    assert_eq!(
        m.clusters[0].outlier,
        Some(Outlier {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 0,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            success_rate: Some(SuccessRate {
                minimum_hosts: 5,
                request_volume: 100,
                stdev_factor_milli: 1900,
            }),
        })
    );

    // A base above the default cap raises the cap (Envoy); stdev factor in thousandths.
    let m = parse(
        &format!(
            "{base}[clusters.outlier]\nbase_ejection_time = \"10m\"\nsuccess_rate_stdev_factor = 2\n\
             consecutive_gateway_failure = 3\n"
        ),
        Path::new("t.toml"),
    )
    .expect("valid");
    let o = m.clusters[0].outlier.clone().expect("outlier");
    assert_eq!(o.max_ejection_time, Duration::from_secs(600));
    assert_eq!(o.consecutive_gateway_failure, 3);
    assert_eq!(o.success_rate.map(|s| s.stdev_factor_milli), Some(2000));
}

#[test]
fn discovery_sources_and_settings() {
    use lbd::config::discovery::{EndpointSource, Settings, SourceKind, TlsName};
    let text = format!(
        "[[clusters]]\nname = \"d\"\n\
         [[clusters.endpoints]]\naddress = \"127.0.0.1:7\"\n\
         [[clusters.endpoints]]\ndns = \"Web.Internal:8080\"\nweight = 3\nbackup = true\n\
         [[clusters.endpoints]]\nsrv = \"_http._tcp.web.internal\"\n\
         [[clusters.endpoints]]\nfile = \"eps.json\"\n\
         [clusters.discovery]\nresolver = \"127.0.0.1:5353\"\nttl_min = \"1s\"\nttl_max = \"30s\"\n\
         retry = \"2s\"\nfile_interval = \"500ms\"\n\
         [[clusters]]\nname = \"only-dns\"\n[[clusters.endpoints]]\ndns = \"a.b:1\"\n{OK_TAIL}"
    );
    let m = parse(&text, Path::new("/etc/lbd/lb.toml")).expect("valid");
    let d = &m.clusters[0];
    assert_eq!(
        d.endpoints.len(),
        1,
        "only the static endpoint until resolution"
    );
    assert_eq!(
        d.sources,
        [
            EndpointSource {
                kind: SourceKind::Dns {
                    host: "web.internal".into(),
                    port: 8080
                },
                weight: 3,
                backup: true,
                tls_name: TlsName::Cluster
            },
            EndpointSource {
                kind: SourceKind::Srv {
                    name: "_http._tcp.web.internal".into()
                },
                weight: 1,
                backup: false,
                tls_name: TlsName::Cluster
            },
            EndpointSource {
                kind: SourceKind::File {
                    path: "/etc/lbd/eps.json".into()
                },
                weight: 1,
                backup: false,
                tls_name: TlsName::Cluster
            },
        ]
    );
    assert_eq!(
        d.discovery,
        Settings {
            resolver: Some("127.0.0.1:5353".parse().expect("addr")),
            ttl_min: Duration::from_secs(1),
            ttl_max: Duration::from_secs(30),
            retry: Duration::from_secs(2),
            query_timeout: Duration::from_secs(2),
            file_interval: Duration::from_millis(500),
        }
    );
    // A cluster with only a DNS name is valid with no endpoint at start (Envoy STRICT_DNS).
    assert!(m.clusters[1].endpoints.is_empty());
    assert_eq!(m.clusters[1].discovery, Settings::default());
}

#[test]
fn tls_client_auth_tickets_and_upstream_tls_are_checked() {
    use lb_tests::certs::{LeafOpts, Pki, toml_path};
    let pki = Pki::new("test CA");
    let good = pki.leaf(
        "good",
        &LeafOpts {
            names: vec!["a.test".into()],
            cn: "leaf".into(),
            serial: 7,
            ..LeafOpts::default()
        },
    );
    let other = pki.leaf(
        "other",
        &LeafOpts {
            names: vec!["b.test".into()],
            cn: "other".into(),
            serial: 8,
            ..LeafOpts::default()
        },
    );
    let keys = pki.write("t.keys", format!("{}\n", "ab".repeat(48)).as_bytes());
    let short = pki.write("short.keys", b"# a comment\nabcdef\n");
    let ca = toml_path(&pki.ca_file);
    // `extra` goes into [listeners.tls], before the certificates (line 5 on).
    let listener = |extra: &str| {
        tls_config(&good.cert, &good.key, "").replace(
            "[listeners.tls]\n[[listeners.tls.certificates]]",
            &format!("[listeners.tls]\n{extra}\n[[listeners.tls.certificates]]"),
        )
    };
    // `tls` is the [clusters.tls] table body (line 7 on), `ep` extra endpoint keys (line 4).
    let cluster = |tls: &str, ep: &str| {
        format!(
            "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\n{ep}\n[clusters.tls]\n{tls}\n{OK_TAIL}"
        )
    };
    let cases: Vec<(&str, String, usize, &str, &str)> = vec![
        (
            "unknown client_auth",
            listener("client_auth = \"sometimes\""),
            5,
            "listeners[0].tls.client_auth",
            "sometimes",
        ),
        (
            "client_auth without a CA",
            listener("client_auth = \"required\""),
            5,
            "listeners[0].tls.client_ca",
            "client_ca",
        ),
        (
            "client_ca with client_auth off",
            listener(&format!("client_ca = {ca}")),
            5,
            "listeners[0].tls.client_ca",
            "unused",
        ),
        (
            "ticket key file with a short key",
            listener(&format!("ticket_key_file = {}", toml_path(&short))),
            5,
            "listeners[0].tls.ticket_key_file",
            "line 2: expected 96 hex digits",
        ),
        (
            "ticket keys with tickets off",
            listener(&format!(
                "session_tickets = false\nticket_key_file = {}",
                toml_path(&keys)
            )),
            6,
            "listeners[0].tls.ticket_key_file",
            "session_tickets = false",
        ),
        (
            "negative session cache",
            listener("session_cache = -1"),
            5,
            "listeners[0].tls.session_cache",
            "",
        ),
        (
            "identity header that is not a header name",
            format!(
                "[[listeners]]\nname = \"s\"\nbind = \"127.0.0.1:0\"\nclient_cert_headers = {{ subject = \"bad header\" }}\n{OK_TAIL}"
            ),
            4,
            "listeners[0].client_cert_headers.subject",
            "invalid header name",
        ),
        (
            "upstream CA file missing",
            cluster("ca = \"/nonexistent/ca.pem\"", ""),
            7,
            "clusters[0].tls.ca",
            "cannot read",
        ),
        (
            "upstream CA with verify = false",
            cluster(&format!("verify = false\nca = {ca}"), ""),
            8,
            "clusters[0].tls.ca",
            "unused",
        ),
        (
            "bad server name",
            cluster("server_name = \"a b\"", ""),
            7,
            "clusters[0].tls.server_name",
            "invalid server name",
        ),
        (
            "client certificate without key",
            cluster(&format!("cert = {}", toml_path(&good.cert)), ""),
            7,
            "clusters[0].tls.cert",
            "both `cert` and `key`",
        ),
        (
            "client key of another certificate",
            cluster(
                &format!(
                    "cert = {}\nkey = {}",
                    toml_path(&good.cert),
                    toml_path(&other.key)
                ),
                "",
            ),
            8,
            "clusters[0].tls.key",
            "does not fit",
        ),
        (
            "an OCSP file that is not DER",
            tls_config(
                &good.cert,
                &good.key,
                &format!("ocsp = {}\n", toml_path(&short)),
            ),
            8,
            "listeners[0].tls.certificates[0].ocsp",
            "not a DER OCSP response",
        ),
        (
            "redirect_https on a TLS listener",
            tls_config(&good.cert, &good.key, "").replace(
                "bind = \"127.0.0.1:0\"\n[listeners.tls]",
                "bind = \"127.0.0.1:0\"\nredirect_https = true\n[listeners.tls]",
            ),
            4,
            "listeners[0].redirect_https",
            "cleartext",
        ),
        (
            "tcp listener without a cluster",
            format!(
                "[[listeners]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\n{OK_TAIL}"
            ),
            4,
            "listeners[0].cluster",
            "needs the cluster",
        ),
        (
            "tcp listener to an unknown cluster",
            format!(
                "[[listeners]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\ncluster = \"nope\"\n{OK_TAIL}"
            ),
            5,
            "listeners[0].cluster",
            "unknown cluster",
        ),
        (
            "tcp listener with tls",
            tls_config(&good.cert, &good.key, "").replace(
                "bind = \"127.0.0.1:0\"\n[listeners.tls]",
                "bind = \"127.0.0.1:0\"\nmode = \"tcp\"\ncluster = \"tail\"\n[listeners.tls]",
            ),
            6,
            "listeners[0].tls",
            "not used by a TCP listener",
        ),
        (
            "cluster on an http listener",
            format!(
                "[[listeners]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\ncluster = \"tail\"\n{OK_TAIL}"
            ),
            4,
            "listeners[0].cluster",
            "mode = \"tcp\"",
        ),
        (
            "proxy_protocol on an http listener",
            format!(
                "[[listeners]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nproxy_protocol = \"v2\"\n{OK_TAIL}"
            ),
            4,
            "listeners[0].proxy_protocol",
            "only sent by TCP listeners",
        ),
        (
            "endpoint server_name without TLS",
            format!(
                "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\naddress = \"127.0.0.1:1\"\nserver_name = \"a.test\"\n{OK_TAIL}"
            ),
            5,
            "clusters[0].endpoints[0].server_name",
            "[clusters.tls]",
        ),
        (
            "dns entry server_name without TLS",
            format!(
                "[[clusters]]\nname = \"c\"\n[[clusters.endpoints]]\ndns = \"web.test:80\"\nserver_name = \"a.test\"\n{OK_TAIL}"
            ),
            5,
            "clusters[0].endpoints[0].server_name",
            "[clusters.tls]",
        ),
        (
            "invalid dns entry server_name",
            cluster("", "dns = \"web.test:80\"\nserver_name = \"a b\"")
                .replace("address = \"127.0.0.1:1\"\n", ""),
            5,
            "clusters[0].endpoints[0].server_name",
            "invalid server name",
        ),
    ];
    let mut failures = Vec::new();
    for (what, text, line, key, msg) in &cases {
        let errs = match parse(text, Path::new("t.toml")) {
            Ok(_) => {
                failures.push(format!("{what}: accepted"));
                continue;
            }
            Err(e) => e.0,
        };
        let ok = errs.len() == 1
            && errs[0].line == *line
            && errs[0].key == *key
            && errs[0].message.contains(msg);
        if !ok {
            let got: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            failures.push(format!(
                "{what}: want {line}: {key}: ..{msg}..\n  got:\n    {}",
                got.join("\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Good values load: the model holds them.
    let text = listener(&format!(
        "client_auth = \"optional\"\nclient_ca = {ca}\nticket_key_file = {}\nsession_cache = 0",
        toml_path(&keys)
    ))
    .replace(
        "bind = \"127.0.0.1:0\"\n[listeners.tls]",
        "bind = \"127.0.0.1:0\"\nclient_cert_headers = { san = \"x-san\" }\n[listeners.tls]",
    );
    let m = parse(&text, Path::new("t.toml")).expect("valid");
    let l = &m.listeners[0];
    let tls = l.tls.as_ref().expect("tls");
    assert_eq!(tls.resumption.cache, 0);
    assert_eq!(
        tls.resumption.ticket_keys.as_ref().map(|k| k.keys.len()),
        Some(1)
    );
    assert_eq!(
        l.cert_headers
            .as_ref()
            .and_then(|h| h.san.as_ref())
            .map(|h| h.as_str()),
        Some("x-san")
    );
    let m = parse(
        &cluster(
            &format!("ca = {ca}\nserver_name = \"A.Test\""),
            "server_name = \"b.test\"",
        ),
        Path::new("t.toml"),
    )
    .expect("valid upstream tls");
    let c = &m.clusters[0];
    let t = c.tls.as_ref().expect("tls");
    assert!(t.verify);
    assert_eq!(t.server_name.as_deref(), Some("a.test"));
    assert_eq!(c.endpoints[0].server_name.as_deref(), Some("b.test"));

    // Discovered endpoints: the DNS name unless the entry or the cluster names one.
    use lbd::config::discovery::TlsName;
    let tls_names = |tls: &str, entry: &str| {
        let m = parse(
            &cluster(tls, &format!("dns = \"web.test:80\"\n{entry}"))
                .replace("address = \"127.0.0.1:1\"\n", ""),
            Path::new("t.toml"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        m.clusters[0].sources[0].tls_name.clone()
    };
    assert_eq!(tls_names(&format!("ca = {ca}"), ""), TlsName::Resolved);
    assert_eq!(
        tls_names(&format!("ca = {ca}"), "server_name = \"e.test\""),
        TlsName::Given("e.test".into())
    );
    assert_eq!(
        tls_names(&format!("ca = {ca}\nserver_name = \"c.test\""), ""),
        TlsName::Cluster
    );
}

#[test]
fn passthrough_and_proxy_accept_keys_are_checked() {
    let p = "[[listeners]]\nname = \"p\"\nbind = \"127.0.0.1:0\"\nmode = \"tls_passthrough\"\n";
    let h = "[[listeners]]\nname = \"h\"\nbind = \"127.0.0.1:0\"\n";
    let cases: Vec<(&str, String, usize, &str, &str)> = vec![
        (
            "sni to an unknown cluster",
            format!("{p}[listeners.sni]\n\"a.test\" = \"nope\"\n"),
            6,
            "listeners[0].sni.\"a.test\"",
            "unknown cluster",
        ),
        (
            "sni name that is not a host name",
            format!("{p}[listeners.sni]\n\"a b\" = \"tail\"\n"),
            6,
            "listeners[0].sni.\"a b\"",
            "invalid server name",
        ),
        (
            "sni name listed twice",
            format!("{p}[listeners.sni]\n\"A.test\" = \"tail\"\n\"a.test\" = \"tail\"\n"),
            7,
            "listeners[0].sni.\"a.test\"",
            "listed twice",
        ),
        (
            "passthrough without sni or cluster",
            p.to_string(),
            4,
            "listeners[0].sni",
            "needs an sni table",
        ),
        (
            "max_hello_bytes too small",
            format!("{p}cluster = \"tail\"\nmax_hello_bytes = 100\n"),
            6,
            "listeners[0].max_hello_bytes",
            "between 1024",
        ),
        (
            "hello_timeout zero",
            format!("{p}cluster = \"tail\"\nhello_timeout = \"0s\"\n"),
            6,
            "listeners[0].hello_timeout",
            "greater than 0",
        ),
        (
            "hello_timeout on an http listener",
            format!("{h}hello_timeout = \"1s\"\n"),
            4,
            "listeners[0].hello_timeout",
            "only used with mode = \"tls_passthrough\"",
        ),
        (
            "tls table on a passthrough listener",
            format!("{p}cluster = \"tail\"\nprotocol = \"h2c\"\n"),
            6,
            "listeners[0].protocol",
            "not used by a passthrough listener",
        ),
        (
            "proxy_protocol_from with host bits",
            format!("{h}proxy_protocol_from = [\"10.0.0.1/8\"]\n"),
            4,
            "listeners[0].proxy_protocol_from",
            "host bits",
        ),
        (
            "proxy_protocol_from not an address",
            format!("{h}proxy_protocol_from = [\"lb.example\"]\n"),
            4,
            "listeners[0].proxy_protocol_from",
            "invalid address",
        ),
        (
            "proxy_protocol_from empty",
            format!("{h}proxy_protocol_from = []\n"),
            4,
            "listeners[0].proxy_protocol_from",
            "empty",
        ),
        (
            "proxy_protocol_timeout alone",
            format!("{h}proxy_protocol_timeout = \"1s\"\n"),
            4,
            "listeners[0].proxy_protocol_timeout",
            "only used with proxy_protocol_from",
        ),
        (
            "proxy_protocol_timeout zero",
            format!("{h}proxy_protocol_from = [\"10.0.0.0/8\"]\nproxy_protocol_timeout = \"0s\"\n"),
            5,
            "listeners[0].proxy_protocol_timeout",
            "greater than 0",
        ),
        (
            "unknown mode",
            format!("{h}mode = \"udp\"\n"),
            4,
            "listeners[0].mode",
            "tls_passthrough",
        ),
    ];
    let mut failures = Vec::new();
    for (what, text, line, key, msg) in &cases {
        let full = format!("{text}{OK_TAIL}");
        let errs = match parse(&full, Path::new("t.toml")) {
            Ok(_) => {
                failures.push(format!("{what}: accepted"));
                continue;
            }
            Err(e) => e.0,
        };
        let ok = errs.len() == 1
            && errs[0].line == *line
            && errs[0].key == *key
            && errs[0].message.contains(msg);
        if !ok {
            let got: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
            failures.push(format!(
                "{what}: want {line}: {key}: ..{msg}..\n  got:\n    {}",
                got.join("\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Good values load: the model holds them, defaults filled in.
    let text = format!(
        "{p}cluster = \"tail\"\nmax_hello_bytes = 4096\nproxy_protocol_from = [\"10.0.0.0/8\", \"::1\"]\n\
         [listeners.sni]\n\"API.Example.com.\" = \"tail\"\n\"*.example.com\" = \"tail\"\n{OK_TAIL}"
    );
    let m = parse(&text, Path::new("t.toml")).expect("valid");
    let pt = m.listeners[0].passthrough.as_ref().expect("passthrough");
    assert_eq!(pt.default.as_deref(), Some("tail"));
    assert_eq!(pt.max_hello_bytes, 4096);
    assert_eq!(pt.hello_timeout, std::time::Duration::from_secs(10));
    let names: Vec<&str> = pt.routes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["*.example.com", "api.example.com"]);
    let acc = m.listeners[0].proxy_accept.as_ref().expect("accept");
    assert_eq!(acc.from.len(), 2);
    assert_eq!(acc.timeout, std::time::Duration::from_secs(5));
    assert!(m.listeners[1].passthrough.is_none() && m.listeners[1].proxy_accept.is_none());
}
