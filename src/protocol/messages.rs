//! Control messages: the JSON envelope and the table of message kinds; the
//! payloads live beside it (handshake, channel, worker, node).
//!
//! Each text frame is one envelope `{"type": ..., "id": ..., "payload": ...}`.
//! Unknown payload fields are ignored (forward compatibility); missing or
//! mistyped fields are rejected with `invalid_request`.

use super::{
    Archive, ChannelClose, ChannelEof, ConfigPoll, DeployApply, DeployRef, DeployRemove, ErrorBody,
    ErrorCode, Exec, Hello, Logs, MAX_CONTROL_BYTES, NodeConfig, NodeStatus, Remove, Resize, Spawn,
    Stat, Stop, TokenRefresh, Tunnel, Welcome, Window, WorkerEvent, WorkerRef,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The outer shape of every control message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default)]
    pub payload: Value,
}

/// The one table of message kinds: each wire name beside its variant and
/// payload type. `Request`, its `kind`, and the encoding and decoding of
/// every request and notice are generated from it.
macro_rules! message_kinds {
    (
        requests { $($rname:literal => $rvar:ident($rty:ty),)* }
        notices { $($nname:literal => $nvar:ident($nty:ty),)* }
    ) => {
        /// Requests the server sends to an agent; each gets one `result` or
        /// `error`.
        // A request lives only while it is handled; boxing the large spawn
        // would add an allocation and change nothing that matters.
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug, Clone, PartialEq)]
        pub enum Request {
            $($rvar($rty),)*
        }

        impl Request {
            /// The wire name (`type`) of this request.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Request::$rvar(_) => $rname,)*
                }
            }

            fn payload(&self) -> Value {
                match self {
                    $(Request::$rvar(p) => to_value(p),)*
                }
            }

            fn decode(
                kind: &str,
                id: &Option<String>,
                payload: Value,
            ) -> Option<Result<Request, DecodeError>> {
                match kind {
                    $($rname => Some(typed(kind, id, payload).map(Request::$rvar)),)*
                    _ => None,
                }
            }
        }

        impl Message {
            /// A message that is neither a request nor a reply, from the
            /// table; the payload back if `kind` is not one.
            fn decode_notice(
                kind: &str,
                id: &Option<String>,
                payload: Value,
            ) -> Result<Result<Message, DecodeError>, Value> {
                match kind {
                    $($nname => Ok(typed(kind, id, payload).map(Message::$nvar)),)*
                    _ => Err(payload),
                }
            }

            fn encode_notice(&self) -> Option<(&'static str, Value)> {
                match self {
                    $(Message::$nvar(p) => Some(($nname, to_value(p))),)*
                    _ => None,
                }
            }
        }
    };
}

message_kinds! {
    requests {
        "spawn" => Spawn(Spawn),
        "stop" => Stop(Stop),
        "remove" => Remove(Remove),
        "inspect" => Inspect(WorkerRef),
        "list_workers" => ListWorkers(ListWorkers),
        "exec" => Exec(Exec),
        "logs" => Logs(Logs),
        "put_archive" => PutArchive(Archive),
        "get_archive" => GetArchive(Archive),
        "stat" => Stat(Stat),
        "resize" => Resize(Resize),
        "configure" => Configure(NodeConfig),
        "tunnel" => Tunnel(Tunnel),
        "deploy_apply" => DeployApply(DeployApply),
        "deploy_inspect" => DeployInspect(DeployRef),
        "deploy_remove" => DeployRemove(DeployRemove),
    }
    notices {
        "hello" => Hello(Hello),
        "welcome" => Welcome(Welcome),
        "window" => Window(Window),
        "channel_eof" => ChannelEof(ChannelEof),
        "channel_close" => ChannelClose(ChannelClose),
        "worker_event" => WorkerEvent(WorkerEvent),
        "node_status" => NodeStatus(NodeStatus),
        "capabilities" => Capabilities(super::CapabilityReport),
        "token" => Token(TokenRefresh),
        "config_poll" => ConfigPoll(ConfigPoll),
    }
}

/// `list_workers` request payload: nothing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ListWorkers {}

/// Every control message, typed.
// Messages live briefly between the socket and a handler; boxing the large
// request variant would buy nothing measurable.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Request {
        id: String,
        request: Request,
    },
    /// Success reply to the request `id`; the payload depends on the request.
    Result {
        id: String,
        payload: Value,
    },
    /// Failure reply to the request `id`, or a connection-level error without id.
    Error {
        id: Option<String>,
        error: ErrorBody,
    },
    Window(Window),
    ChannelEof(ChannelEof),
    ChannelClose(ChannelClose),
    WorkerEvent(WorkerEvent),
    NodeStatus(NodeStatus),
    /// A new capability report (agent to server), sent when its hash changes.
    Capabilities(super::CapabilityReport),
    Token(TokenRefresh),
    /// Agent to server: "send me newer configuration if you have it"
    /// (`updates.enable_dynamic_config`); carries the applied version.
    ConfigPoll(ConfigPoll),
    /// A type this build does not know; answered with `unsupported` when it has an id.
    Unknown {
        kind: String,
        id: Option<String>,
    },
}

/// A text frame that could not be turned into a [`Message`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{error}")]
pub struct DecodeError {
    /// The request id, when the envelope was readable enough to carry one.
    pub id: Option<String>,
    pub error: ErrorBody,
}

fn typed<T: DeserializeOwned>(kind: &str, id: &Option<String>, v: Value) -> Result<T, DecodeError> {
    serde_json::from_value(v).map_err(|e| DecodeError {
        id: id.clone(),
        error: ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!("malformed `{kind}` payload: {e}"),
        ),
    })
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("protocol payloads serialize")
}

impl Message {
    /// The `too_large` answer to a text over a receiver's limit: with the
    /// message's `id` when the text is a JSON object whose `id` is a string
    /// (so the request, or the request a reply answers, fails at once
    /// instead of waiting for its timeout), else without (§4.3).
    pub fn oversized(text: &str, message: String) -> DecodeError {
        #[derive(Deserialize)]
        struct IdOnly {
            id: Option<String>,
        }
        DecodeError {
            id: serde_json::from_str::<IdOnly>(text).ok().and_then(|e| e.id),
            error: ErrorBody::new(ErrorCode::TooLarge, message),
        }
    }

    /// Parses one text frame.
    pub fn decode(text: &str) -> Result<Message, DecodeError> {
        if text.len() > MAX_CONTROL_BYTES {
            return Err(Message::oversized(
                text,
                format!(
                    "control message of {} bytes exceeds the limit of {MAX_CONTROL_BYTES}",
                    text.len()
                ),
            ));
        }
        let env: Envelope = serde_json::from_str(text).map_err(|e| DecodeError {
            id: None,
            error: ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!("malformed envelope: {e}"),
            ),
        })?;
        let Envelope { kind, id, payload } = env;
        let need_id = |id: Option<String>| {
            id.ok_or_else(|| DecodeError {
                id: None,
                error: ErrorBody::new(
                    ErrorCode::InvalidRequest,
                    format!("`{kind}` message without an `id`"),
                ),
            })
        };
        // A payload may be left out where it would be empty.
        let payload = if payload.is_null() {
            Value::Object(Default::default())
        } else {
            payload
        };
        match kind.as_str() {
            "result" => Ok(Message::Result {
                id: need_id(id)?,
                payload,
            }),
            "error" => Ok(Message::Error {
                error: typed(&kind, &id, payload)?,
                id,
            }),
            k => {
                let payload = match Message::decode_notice(k, &id, payload) {
                    Ok(notice) => return notice,
                    Err(payload) => payload,
                };
                match Request::decode(k, &id, payload) {
                    Some(r) => Ok(Message::Request {
                        request: r?,
                        id: need_id(id)?,
                    }),
                    None => Ok(Message::Unknown { kind, id }),
                }
            }
        }
    }

    /// Serializes to the text of one frame.
    pub fn encode(&self) -> String {
        let (kind, id, payload): (&str, Option<&str>, Value) = match self {
            Message::Request { id, request } => (request.kind(), Some(id), request.payload()),
            Message::Result { id, payload } => ("result", Some(id), payload.clone()),
            Message::Error { id, error } => ("error", id.as_deref(), to_value(error)),
            Message::Unknown { kind, id } => (kind, id.as_deref(), Value::Null),
            notice => {
                let (kind, payload) = notice
                    .encode_notice()
                    .expect("every other message is in the table of kinds");
                (kind, None, payload)
            }
        };
        let env = Envelope {
            kind: kind.to_string(),
            id: id.map(str::to_string),
            payload,
        };
        serde_json::to_string(&env).expect("envelopes serialize")
    }

    pub fn error(id: Option<String>, code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error {
            id,
            error: ErrorBody::new(code, message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn request_round_trip() {
        let m = Message::Request {
            id: "r1".into(),
            request: Request::Exec(Exec {
                channel: 3,
                worker_id: "w".into(),
                cmd: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: BTreeMap::new(),
                workdir: None,
                user: None,
                tty: false,
                stdin: true,
                size: None,
                timeout_secs: None,
                window: 1024,
                label: Some("server's own".into()),
            }),
        };
        let text = m.encode();
        assert!(
            text.starts_with(r#"{"type":"exec","id":"r1","payload":{"#),
            "{text}"
        );
        assert_eq!(Message::decode(&text).unwrap(), m);
    }

    #[test]
    fn every_kind_in_the_table_round_trips_under_its_wire_name() {
        let archive = Archive {
            channel: 1,
            worker_id: "w".into(),
            path: "/".into(),
            window: 8,
        };
        let requests = [
            (
                "stop",
                Request::Stop(Stop {
                    worker_id: "w".into(),
                    timeout_secs: Some(1),
                }),
            ),
            (
                "remove",
                Request::Remove(Remove {
                    worker_id: "w".into(),
                    force: true,
                }),
            ),
            (
                "inspect",
                Request::Inspect(WorkerRef {
                    worker_id: "w".into(),
                }),
            ),
            ("list_workers", Request::ListWorkers(ListWorkers {})),
            (
                "logs",
                Request::Logs(Logs {
                    channel: 2,
                    worker_id: "w".into(),
                    ..Default::default()
                }),
            ),
            ("put_archive", Request::PutArchive(archive.clone())),
            ("get_archive", Request::GetArchive(archive)),
            (
                "stat",
                Request::Stat(Stat {
                    worker_id: "w".into(),
                    path: "/x".into(),
                }),
            ),
            (
                "resize",
                Request::Resize(Resize {
                    channel: 3,
                    size: TermSize { cols: 80, rows: 24 },
                }),
            ),
            ("configure", Request::Configure(NodeConfig::default())),
        ];
        for (name, request) in requests {
            assert_eq!(request.kind(), name);
            let m = Message::Request {
                id: "i".into(),
                request,
            };
            let text = m.encode();
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["type"], name);
            assert_eq!(Message::decode(&text).unwrap(), m, "{name}");
        }
        let notices = [
            (
                "window",
                Message::Window(Window {
                    channel: 1,
                    acked: 2,
                    limit: 3,
                }),
            ),
            (
                "channel_eof",
                Message::ChannelEof(ChannelEof { channel: 1 }),
            ),
            (
                "node_status",
                Message::NodeStatus(NodeStatus {
                    status: NodeHealth::Degraded,
                    reason: Some("r".into()),
                    at: "t".into(),
                }),
            ),
            (
                "capabilities",
                Message::Capabilities(super::super::CapabilityReport {
                    version: 1,
                    extra: serde_json::json!({"from_a_newer_agent": 1})
                        .as_object()
                        .cloned()
                        .unwrap(),
                    ..Default::default()
                }),
            ),
            (
                "token",
                Message::Token(TokenRefresh {
                    node_jwt: "j".into(),
                    expires_at: "t".into(),
                }),
            ),
            (
                "config_poll",
                Message::ConfigPoll(ConfigPoll {
                    config_version: None,
                }),
            ),
        ];
        for (name, m) in notices {
            let text = m.encode();
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["type"], name);
            assert_eq!(Message::decode(&text).unwrap(), m, "{name}");
        }
        // A request whose payload would be empty may leave it out.
        assert_eq!(
            Message::decode(r#"{"type":"list_workers","id":"x"}"#).unwrap(),
            Message::Request {
                id: "x".into(),
                request: Request::ListWorkers(ListWorkers {})
            }
        );
        // A request without an id is refused, naming the kind.
        let e = Message::decode(r#"{"type":"stop","payload":{"worker_id":"w"}}"#).unwrap_err();
        assert!(e.error.message.contains("`stop`"), "{}", e.error.message);
    }

    #[test]
    fn closed_sets_on_the_wire_keep_an_unknown_for_growth() {
        let st: NodeStatus = serde_json::from_str(r#"{"status":"melting","at":"t"}"#).unwrap();
        assert_eq!(st.status, NodeHealth::Unknown);
        let w: WorkerState = serde_json::from_str(r#""hibernating""#).unwrap();
        assert_eq!(w, WorkerState::Unknown);
        assert_eq!(WorkerState::from_docker("exited"), WorkerState::Exited);
        assert_eq!(format!("{:<8}|", WorkerState::Running), "running |");
        let a: ConfigAck = serde_json::from_str(
            r#"{"config_version":"v","status":"rolled_back","effective_config_hash":"h",
                "error":{"type":"apply","message":"m"}}"#,
        )
        .unwrap();
        assert_eq!(a.status, AckStatus::RolledBack);
        assert_eq!(a.error.unwrap().kind, AckErrorKind::Apply);
    }

    #[test]
    fn spawn_flattens_spec() {
        let text = r#"{"type":"spawn","id":"a","payload":{"worker_id":"w1","image":"img","cmd":["true"]}}"#;
        let Message::Request {
            request: Request::Spawn(s),
            ..
        } = Message::decode(text).unwrap()
        else {
            panic!("not a spawn");
        };
        assert_eq!(s.worker_id, "w1");
        assert_eq!(s.spec.image, "img");
        assert_eq!(s.spec.cmd, vec!["true"]);
    }

    #[test]
    fn spawn_refuses_unknown_fields_by_name() {
        for (payload, field) in [
            (
                r#"{"worker_id":"w1","image":"img","privilegd":true}"#,
                "privilegd",
            ),
            (
                r#"{"worker_id":"w1","image":"img","resources":{"memroy_mb":5}}"#,
                "memroy_mb",
            ),
            (
                r#"{"worker_id":"w1","image":"img","mounts":[{"source":"/a","target":"/b","mode":"rw"}]}"#,
                "mode",
            ),
        ] {
            let text = format!(r#"{{"type":"spawn","id":"a","payload":{payload}}}"#);
            let e = Message::decode(&text).unwrap_err();
            assert_eq!(e.error.code, ErrorCode::InvalidRequest);
            assert!(e.error.message.contains(field), "{}", e.error.message);
        }
        let e: Result<SpawnRequest, _> = serde_json::from_str(r#"{"image":"i","netwrk":"host"}"#);
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("unknown field `netwrk`")
        );
    }

    #[test]
    fn unknown_type_is_explicit() {
        let m = Message::decode(r#"{"type":"frobnicate","id":"x","payload":{}}"#).unwrap();
        assert_eq!(
            m,
            Message::Unknown {
                kind: "frobnicate".into(),
                id: Some("x".into())
            }
        );
    }

    #[test]
    fn malformed_payload_keeps_id() {
        let e =
            Message::decode(r#"{"type":"stop","id":"q","payload":{"worker_id":5}}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("q"));
        assert_eq!(e.error.code, ErrorCode::InvalidRequest);
        let e = Message::decode("not json").unwrap_err();
        assert_eq!(e.id, None);
        let e = Message::decode(r#"{"type":"stop","payload":{"worker_id":"w"}}"#).unwrap_err();
        assert!(e.error.message.contains("without an `id`"));
    }

    #[test]
    fn oversized_is_too_large() {
        let big = format!(
            r#"{{"type":"x","payload":"{}"}}"#,
            "a".repeat(MAX_CONTROL_BYTES)
        );
        let e = Message::decode(&big).unwrap_err();
        assert_eq!((e.error.code, e.id), (ErrorCode::TooLarge, None));
        // With its id, when it has one: the request it is fails at once.
        let big = format!(
            r#"{{"type":"result","id":"r7","payload":"{}"}}"#,
            "a".repeat(MAX_CONTROL_BYTES)
        );
        let e = Message::decode(&big).unwrap_err();
        assert_eq!(
            (e.error.code, e.id.as_deref()),
            (ErrorCode::TooLarge, Some("r7"))
        );
    }

    #[test]
    fn unknown_error_code_survives() {
        let m = Message::decode(
            r#"{"type":"error","id":"1","payload":{"code":"new_code","message":"m"}}"#,
        )
        .unwrap();
        let Message::Error { error, .. } = m else {
            panic!()
        };
        assert_eq!(error.code, ErrorCode::Unknown);
    }

    proptest! {
        #[test]
        fn decode_never_panics(s in ".{0,200}") {
            let _ = Message::decode(&s);
        }

        #[test]
        fn decode_json_shapes_never_panics(kind in "(hello|welcome|result|error|window|spawn|exec|logs|stat|resize|channel_close|[a-z]{1,8})",
                                           id in proptest::option::of("[a-z0-9]{0,5}"),
                                           payload in "(\\{\\}|null|1|\"x\"|\\{\"channel\":1\\}|\\[\\])") {
            let text = match id {
                Some(id) => format!(r#"{{"type":"{kind}","id":"{id}","payload":{payload}}}"#),
                None => format!(r#"{{"type":"{kind}","payload":{payload}}}"#),
            };
            let _ = Message::decode(&text);
        }
    }
}
