//! The OpenAPI 3.1 document, generated from this crate: the schemas from
//! the wire types, the operations from [`ROUTES`], the one table of routes
//! (the server checks that it serves exactly these).

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, InfoBuilder, OpenApi, Ref, Required, ResponseBuilder};
use utoipa::OpenApi as _;

use crate::types::*;
use crate::{ErrorBody, ErrorEnvelope, Outcome};

/// What a route answers when it succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// JSON of the named schema, with this status.
    Json(u16, &'static str),
    /// Prometheus text exposition.
    Text,
    /// The web console's page.
    Html,
}

/// A query parameter's JSON type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    String,
    Integer,
    Boolean,
}

/// A query parameter: name, JSON type, description.
pub type Query = (&'static str, Kind, &'static str);

/// One route of the HTTP API.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    /// With `{name}` for path parameters, as axum and OpenAPI write it.
    pub path: &'static str,
    pub operation_id: &'static str,
    pub summary: &'static str,
    /// The request body's schema, if it takes one.
    pub request: Option<&'static str>,
    pub answer: Answer,
    pub query: &'static [Query],
    /// Needs the client token (when one is configured).
    pub authenticated: bool,
}

const READ: &[Query] = &[(
    "stale",
    Kind::Boolean,
    "answer from this node's state without a read barrier (marked `X-Phalanx-Stale: true`)",
)];
const LIST: &[Query] = &[
    ("queue", Kind::String, "only this queue"),
    ("state", Kind::String, "only this state: pending, leased, succeeded, failed, cancelled, dead or paused"),
    ("after", Kind::Integer, "ids greater than this (the previous page's `next_after`)"),
    ("limit", Kind::Integer, "1..=1000 tasks (default 100)"),
    ("stale", Kind::Boolean, "answer from this node's state without a read barrier"),
];

macro_rules! route {
    ($method:literal $path:literal $id:literal, $summary:literal, $request:expr, $answer:expr) => {
        route!($method $path $id, $summary, $request, $answer, &[])
    };
    ($method:literal $path:literal $id:literal, $summary:literal, $request:expr, $answer:expr, $query:expr) => {
        Route {
            method: $method,
            path: $path,
            operation_id: $id,
            summary: $summary,
            request: $request,
            answer: $answer,
            query: $query,
            authenticated: true,
        }
    };
}

/// Every client route, in docs/api.md's order. Raft RPCs (peer traffic) are
/// not part of the public contract.
pub const ROUTES: &[Route] = &[
    route!("POST" "/v1/tasks" "submit", "Submit a task", Some("SubmitRequest"), Answer::Json(201, "Submitted")),
    route!("GET" "/v1/tasks" "list_tasks", "List tasks, oldest first, a page at a time", None, Answer::Json(200, "TaskPage"), LIST),
    route!("POST" "/v1/tasks/batch" "submit_batch", "Submit many tasks in one log entry, each answered on its own", Some("BatchRequest"), Answer::Json(200, "BatchAnswer")),
    route!("POST" "/v1/tasks/complete" "complete_many", "Report many results in one log entry, each answered on its own", Some("CompleteManyRequest"), Answer::Json(200, "CompleteManyAnswer")),
    route!("GET" "/v1/tasks/{id}" "get_task", "Read a task", None, Answer::Json(200, "Task"), READ),
    route!("POST" "/v1/tasks/{id}/cancel" "cancel", "Cancel a task that is not finished", None, Answer::Json(200, "Task")),
    route!("POST" "/v1/tasks/{id}/complete" "complete", "Report a result under a lease's fence", Some("CompleteRequest"), Answer::Json(200, "Task")),
    route!("POST" "/v1/tasks/{id}/fail" "fail", "Report a failure under a lease's fence", Some("FailRequest"), Answer::Json(200, "Task")),
    route!("POST" "/v1/tasks/{id}/extend" "extend", "Extend a lease", Some("ExtendRequest"), Answer::Json(200, "Extended")),
    route!("POST" "/v1/tasks/{id}/wait" "wait", "Declare that a leased task waits on others", Some("WaitRequest"), Answer::Json(200, "Waiting")),
    route!("POST" "/v1/tasks/{id}/progress" "progress", "Report progress on a lease (it is not stuck)", Some("ProgressRequest"), Answer::Json(200, "Ok")),
    route!("POST" "/v1/tasks/{id}/pause" "pause", "Pause a task (a leased one when its lease ends without a result)", None, Answer::Json(200, "Task")),
    route!("POST" "/v1/tasks/{id}/resume" "resume", "Resume a paused task", None, Answer::Json(200, "Task")),
    route!("POST" "/v1/tasks/replay" "replay", "Move dead or paused tasks matching a filter back to pending", Some("ReplayRequest"), Answer::Json(200, "Replayed")),
    route!("PUT" "/v1/tasks/{id}/budget" "set_budget", "Set or remove a root task's budget for its tree", Some("BudgetRequest"), Answer::Json(200, "BudgetSet")),
    route!("GET" "/v1/limits" "list_limits", "The limits table and every concurrency key in use", None, Answer::Json(200, "LimitsTable"), READ),
    route!("GET" "/v1/limits/{key}" "get_limits", "The limits in force for a key and what it uses now", None, Answer::Json(200, "KeyStatus"), READ),
    route!("PUT" "/v1/limits/{key}" "set_limits", "Set the limits of a key, a wildcard (`tenant:*`) or `*`", Some("KeyLimits"), Answer::Json(200, "LimitRule")),
    route!("DELETE" "/v1/limits/{key}" "delete_limits", "Delete an entry of the limits table", None, Answer::Json(200, "Ok")),
    route!("POST" "/v1/agents/register" "register", "Start an agent session", Some("RegisterRequest"), Answer::Json(200, "Registered")),
    route!("POST" "/v1/agents/{agent_id}/heartbeat" "heartbeat", "Keep an agent session alive", Some("SessionRequest"), Answer::Json(200, "Ok")),
    route!("POST" "/v1/agents/{agent_id}/poll" "poll", "Long-poll for leases", Some("PollRequest"), Answer::Json(200, "Polled")),
    route!("POST" "/v1/agents/{agent_id}/deregister" "deregister", "End an agent session (its leases go back to pending)", Some("SessionRequest"), Answer::Json(200, "Ok")),
    route!("GET" "/v1/agents" "list_agents", "List agent sessions", None, Answer::Json(200, "Agents"), READ),
    route!("GET" "/v1/conversations/{id}" "get_conversation", "Read a conversation's shared context", None, Answer::Json(200, "Conversation"), READ),
    route!("DELETE" "/v1/conversations/{id}" "delete_conversation", "Delete a conversation and its context", None, Answer::Json(200, "ConversationDeleted")),
    route!("PUT" "/v1/conversations/{id}/{key}" "put_context", "Write one key of a conversation's context", Some("ContextPutRequest"), Answer::Json(200, "ContextWritten")),
    route!("GET" "/v1/status" "status", "What an operator needs at a glance", None, Answer::Json(200, "Status"), READ),
    route!("GET" "/v1/cluster" "cluster", "This node's view of the Raft group", None, Answer::Json(200, "ClusterInfo")),
    route!("POST" "/v1/cluster/members" "add_member", "Add a node (as a learner, then a voter once caught up)", Some("AddMemberRequest"), Answer::Json(200, "MemberChanged")),
    route!("DELETE" "/v1/cluster/members/{id}" "remove_member", "Remove a node, if a healthy majority stays", None, Answer::Json(200, "MemberChanged")),
    route!("GET" "/v1/config" "get_config", "Read the replicated policy", None, Answer::Json(200, "Config"), READ),
    route!("PUT" "/v1/config" "set_config", "Change the policy (compare-and-set)", Some("ConfigSetRequest"), Answer::Json(200, "PolicySet")),
    route!("GET" "/v1/config/history" "config_history", "The policy's versions", None, Answer::Json(200, "ConfigHistory"), READ),
    route!("POST" "/v1/config/rollback" "rollback_config", "Make an earlier policy version current again (compare-and-set)", Some("RollbackRequest"), Answer::Json(200, "RolledBack")),
    route!("GET" "/v1/openapi.json" "openapi", "This document", None, Answer::Json(200, "OpenApiDocument")),
    route!("GET" "/metrics" "metrics", "Prometheus metrics", None, Answer::Text),
    Route {
        authenticated: false,
        ..route!("GET" "/ui" "console", "The web console (its API calls carry the token)", None, Answer::Html)
    },
    Route {
        authenticated: false,
        ..route!("GET" "/health/live" "live", "The process answers", None, Answer::Json(200, "Live"))
    },
    Route {
        authenticated: false,
        ..route!("GET" "/health/ready" "ready", "A leader is known and this node is caught up (else 503 not_ready)", None, Answer::Json(200, "Ready"))
    },
];

/// `GET /health/live`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Live {
    pub live: bool,
    pub node_id: u64,
}

/// An OpenAPI document (this one).
#[derive(utoipa::ToSchema)]
#[schema(as = OpenApiDocument)]
#[allow(dead_code)]
struct OpenApiDocument {
    openapi: String,
    #[schema(value_type = Object)]
    info: (),
    #[schema(value_type = Object)]
    paths: (),
}

#[derive(utoipa::OpenApi)]
#[openapi(components(schemas(
    ErrorEnvelope,
    ErrorBody,
    Outcome,
    TaskState,
    SubmitRequest,
    BatchRequest,
    Submitted,
    Refusal,
    BatchItem,
    BatchAnswer,
    TrailStep,
    TaskLease,
    Task,
    TaskPage,
    CompleteRequest,
    CompleteItem,
    CompleteManyRequest,
    Ack,
    CompleteManyItem,
    CompleteManyAnswer,
    FailRequest,
    ExtendRequest,
    Extended,
    ProgressRequest,
    WaitRequest,
    Waiting,
    Ok,
    RegisterRequest,
    Registered,
    SessionRequest,
    PollRequest,
    Child,
    LeaseGrant,
    Polled,
    AgentInfo,
    Agents,
    ContextPutRequest,
    ContextWritten,
    ContextEntry,
    Conversation,
    ConversationDeleted,
    Config,
    PolicyVersion,
    ConfigHistory,
    ConfigSetRequest,
    PolicySet,
    RollbackRequest,
    RolledBack,
    ClusterNode,
    ClusterInfo,
    AddMemberRequest,
    MemberChanged,
    Ready,
    Status,
    Usage,
    Budget,
    PauseCause,
    Pause,
    WaitingOn,
    KeyLimits,
    LimitRule,
    KeyStatus,
    LimitsTable,
    ReplayRequest,
    Replayed,
    BudgetRequest,
    BudgetSet,
    TreeSpend,
    Live,
    OpenApiDocument
)))]
struct Components;

fn method(text: &str) -> HttpMethod {
    match text {
        "GET" => HttpMethod::Get,
        "POST" => HttpMethod::Post,
        "PUT" => HttpMethod::Put,
        "DELETE" => HttpMethod::Delete,
        other => panic!("ROUTES names method {other}"),
    }
}

fn json_content(schema: &str) -> utoipa::openapi::Content {
    ContentBuilder::new().schema(Some(Ref::from_schema_name(schema))).build()
}

/// The whole document.
pub fn document() -> OpenApi {
    let mut api = Components::openapi();
    api.info = InfoBuilder::new()
        .title("Phalanx HTTP API")
        .version("1")
        .description(Some(
            "A replicated orchestrator for multi-agent systems. Every node serves the whole API. \
             Errors are `{\"error\": {code, message, outcome, leader_hint?, retry_after_ms?}}`; \
             the guide is docs/api.md.",
        ))
        .build();
    let components = api.components.get_or_insert_with(Default::default);
    components
        .add_security_scheme("token", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
    for route in ROUTES {
        let mut operation = OperationBuilder::new().operation_id(Some(route.operation_id)).summary(Some(route.summary));
        for name in route.path.split('/').filter_map(|part| part.strip_prefix('{')?.strip_suffix('}')) {
            let schema = if name == "id" && route.path.starts_with("/v1/tasks") || route.path.starts_with("/v1/cluster")
            {
                ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)).build()
            } else {
                ObjectBuilder::new().schema_type(Type::String).build()
            };
            operation = operation.parameter(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(schema)),
            );
        }
        for (name, kind, description) in route.query {
            operation = operation.parameter(
                ParameterBuilder::new()
                    .name(*name)
                    .parameter_in(ParameterIn::Query)
                    .required(Required::False)
                    .description(Some(*description))
                    .schema(Some(
                        ObjectBuilder::new()
                            .schema_type(match kind {
                                Kind::String => Type::String,
                                Kind::Integer => Type::Integer,
                                Kind::Boolean => Type::Boolean,
                            })
                            .build(),
                    )),
            );
        }
        if let Some(schema) = route.request {
            operation = operation.request_body(Some(
                RequestBodyBuilder::new()
                    .content("application/json", json_content(schema))
                    .required(Some(Required::True))
                    .build(),
            ));
        }
        let (status, success) = match route.answer {
            Answer::Json(status, schema) => (
                status,
                ResponseBuilder::new().description("success").content("application/json", json_content(schema)),
            ),
            Answer::Html => (
                200,
                ResponseBuilder::new().description("the web console's page").content(
                    "text/html",
                    ContentBuilder::new().schema(Some(ObjectBuilder::new().schema_type(Type::String).build())).build(),
                ),
            ),
            Answer::Text => (
                200,
                ResponseBuilder::new().description("Prometheus text exposition").content(
                    "text/plain",
                    ContentBuilder::new().schema(Some(ObjectBuilder::new().schema_type(Type::String).build())).build(),
                ),
            ),
        };
        operation = operation.response(status.to_string(), success.build()).response(
            "default",
            ResponseBuilder::new()
                .description("a refusal: the code, whether the request may have taken effect, where to retry")
                .content("application/json", json_content("ErrorEnvelope"))
                .build(),
        );
        if route.authenticated {
            operation =
                operation.security(utoipa::openapi::security::SecurityRequirement::new("token", Vec::<String>::new()));
        }
        api.paths.add_path_operation(route.path, vec![method(route.method)], operation.build());
    }
    api
}

/// The document as committed in docs/openapi.json: pretty, with a newline.
pub fn document_json() -> String {
    let mut text = serde_json::to_string_pretty(&document()).expect("the document serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_schema_an_operation_names_is_defined() {
        let document: serde_json::Value = serde_json::from_str(&document_json()).unwrap();
        assert_eq!(document["openapi"], "3.1.0");
        let text = document_json();
        for reference in text.split("\"$ref\": \"#/components/schemas/").skip(1) {
            let name = &reference[..reference.find('"').unwrap()];
            assert!(document["components"]["schemas"][name].is_object(), "{name} is referenced and not defined");
        }
    }

    #[test]
    fn the_committed_document_is_the_generated_one() {
        let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json"))
            .unwrap_or_default();
        if committed != document_json() {
            if std::env::var_os("PHALANX_WRITE_OPENAPI").is_some() {
                std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json"), document_json())
                    .unwrap();
                return;
            }
            panic!(
                "docs/openapi.json differs from the document the code generates: \
                 run `PHALANX_WRITE_OPENAPI=1 cargo test -p phalanx-api` and commit it"
            );
        }
    }
}
