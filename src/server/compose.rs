//! The Compose subset tether deploys (docs/deployments.md): read strictly,
//! so a key tether does not apply is refused with its line instead of
//! being silently ignored, then turned into a [`DeployApply`] with the
//! services in start order.

use crate::protocol::{
    DependsCondition, DependsOn, DeployApply, ErrorBody, ErrorCode, Healthcheck, MAX_SERVICE_NAME,
    Mount, NetworkPolicy, RestartPolicy, ServiceSpec, VolumeMount, valid_name,
};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    name: Option<String>,
    /// Accepted and ignored, as Compose itself does.
    #[serde(default)]
    #[allow(dead_code)]
    version: Option<String>,
    services: BTreeMap<String, Service>,
    #[serde(default)]
    volumes: BTreeMap<String, Option<VolumeDecl>>,
}

/// A top-level volume: only the default driver, nothing to set.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeDecl {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Service {
    image: String,
    #[serde(default)]
    command: Option<Words>,
    #[serde(default)]
    entrypoint: Option<Words>,
    #[serde(default)]
    environment: Option<serde_json::Value>,
    #[serde(default)]
    labels: Option<serde_json::Value>,
    #[serde(default)]
    depends_on: Option<Depends>,
    #[serde(default)]
    healthcheck: Option<Check>,
    #[serde(default)]
    restart: Option<String>,
    #[serde(default)]
    cpus: Option<Scalar>,
    #[serde(default)]
    mem_limit: Option<Scalar>,
    #[serde(default)]
    pids_limit: Option<i64>,
    #[serde(default)]
    expose: Vec<Scalar>,
    #[serde(default)]
    volumes: Vec<String>,
}

/// A command as a list, or as one string split like a shell would.
#[derive(Deserialize)]
#[serde(untagged)]
enum Words {
    List(Vec<String>),
    Line(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Depends {
    List(Vec<String>),
    Map(BTreeMap<String, DependsEntry>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DependsEntry {
    #[serde(default)]
    condition: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Check {
    test: Words,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retries: Option<u32>,
    #[serde(default)]
    start_period: Option<String>,
}

/// A number or a string (Compose takes both in many places).
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum Scalar {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

impl Scalar {
    fn text(&self) -> String {
        match self {
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Bool(b) => b.to_string(),
            Scalar::Str(s) => s.clone(),
        }
    }
}

fn bad(msg: String) -> ErrorBody {
    ErrorBody::new(ErrorCode::InvalidRequest, msg)
}

/// Splits a command line as a POSIX shell would into words (quotes and
/// backslashes; no expansion).
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(format!("unclosed ' in {line:?}")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => cur.push(c),
                            None => return Err(format!("trailing \\ in {line:?}")),
                        },
                        Some(c) => cur.push(c),
                        None => return Err(format!("unclosed \" in {line:?}")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => return Err(format!("trailing \\ in {line:?}")),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

fn words(w: Words, what: &str) -> Result<Vec<String>, ErrorBody> {
    match w {
        Words::List(v) => Ok(v),
        Words::Line(s) => split_words(&s).map_err(|e| bad(format!("{what}: {e}"))),
    }
}

/// `KEY: value` pairs as a map, or a list of `KEY=value`.
fn pairs(p: &Option<serde_json::Value>, what: &str) -> Result<BTreeMap<String, String>, ErrorBody> {
    use serde_json::Value;
    let text = |v: &Value| match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match p {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => Ok(m.iter().map(|(k, v)| (k.clone(), text(v))).collect()),
        Some(Value::Array(l)) => l
            .iter()
            .map(|kv| match text(kv).split_once('=') {
                Some((k, v)) => Ok((k.to_string(), v.to_string())),
                None => Err(bad(format!(
                    "{what}: {kv} has no '=' (a value from the operator's environment is not supported)"
                ))),
            })
            .collect(),
        Some(other) => Err(bad(format!("{what}: expected a map or a list, not {other}"))),
    }
}

/// `1m30s`, `10s`, `500ms` (Compose durations) in milliseconds.
fn duration_ms(s: &str, what: &str) -> Result<u64, ErrorBody> {
    humantime::parse_duration(s)
        .map(|d| d.as_millis() as u64)
        .map_err(|e| bad(format!("{what}: {s:?} is not a duration: {e}")))
}

/// `512m`, `1g`, `1048576` (bytes) in MB.
fn memory_mb(s: &str, what: &str) -> Result<u64, ErrorBody> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| bad(format!("{what}: {s:?} is not a size (e.g. 512m, 1g)")))?;
    let mb = (n * mult as f64 / (1u64 << 20) as f64).ceil() as u64;
    if mb == 0 {
        return Err(bad(format!("{what}: {s:?} is less than 1 MB")));
    }
    Ok(mb)
}

/// Reads a Compose file into a deployment named `name` (or the file's
/// `name:`).
pub fn parse(
    text: &str,
    name: Option<&str>,
    network_policy: Option<NetworkPolicy>,
) -> Result<DeployApply, ErrorBody> {
    let file: File = serde_saphyr::from_str(text).map_err(|e| bad(format!("compose file: {e}")))?;
    let deployment = name.map(str::to_string).or(file.name).ok_or_else(|| {
        bad("the deployment needs a name: --name NAME, or name: in the file".into())
    })?;
    if let Some(why) = crate::protocol::deployment_name_error(&deployment) {
        return Err(bad(why));
    }
    if file.services.is_empty() {
        return Err(bad("compose file: no services".into()));
    }
    if file.services.len() > crate::protocol::MAX_SERVICES {
        return Err(bad(format!(
            "compose file: {} services; a deployment has at most {}",
            file.services.len(),
            crate::protocol::MAX_SERVICES
        )));
    }
    let declared: BTreeSet<&str> = file.volumes.keys().map(String::as_str).collect();
    let mut specs = BTreeMap::new();
    for (sname, s) in &file.services {
        let at = |key: &str| format!("services.{sname}.{key}");
        if !valid_name(sname, MAX_SERVICE_NAME) {
            return Err(bad(format!(
                "service name {sname:?}: lowercase letters, digits and '-', at most {MAX_SERVICE_NAME}"
            )));
        }
        let depends_on = match &s.depends_on {
            None => Vec::new(),
            Some(Depends::List(l)) => l
                .iter()
                .map(|d| DependsOn {
                    service: d.clone(),
                    condition: DependsCondition::ServiceStarted,
                })
                .collect(),
            Some(Depends::Map(m)) => m
                .iter()
                .map(|(d, e)| {
                    let condition = match e.condition.as_deref() {
                        None | Some("service_started") => DependsCondition::ServiceStarted,
                        Some("service_healthy") => DependsCondition::ServiceHealthy,
                        Some(c) => {
                            return Err(bad(format!(
                                "{}: condition {c:?} is not supported (service_started, service_healthy)",
                                at("depends_on")
                            )));
                        }
                    };
                    Ok(DependsOn {
                        service: d.clone(),
                        condition,
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        for d in &depends_on {
            if !file.services.contains_key(&d.service) {
                return Err(bad(format!(
                    "{}: no service named {}",
                    at("depends_on"),
                    d.service
                )));
            }
        }
        let healthcheck = match &s.healthcheck {
            None => None,
            Some(h) => {
                let test = match &h.test {
                    Words::List(v) => v.clone(),
                    Words::Line(l) => vec!["CMD-SHELL".into(), l.clone()],
                };
                let ms = |v: &Option<String>, k: &str| {
                    v.as_deref()
                        .map(|s| duration_ms(s, &at(&format!("healthcheck.{k}"))))
                        .transpose()
                };
                Some(Healthcheck {
                    test,
                    interval_ms: ms(&h.interval, "interval")?,
                    timeout_ms: ms(&h.timeout, "timeout")?,
                    retries: h.retries,
                    start_period_ms: ms(&h.start_period, "start_period")?,
                })
            }
        };
        let restart = match s.restart.as_deref() {
            None | Some("no") => RestartPolicy::No,
            Some("on-failure") => RestartPolicy::OnFailure,
            Some("always") => RestartPolicy::Always,
            Some("unless-stopped") => RestartPolicy::UnlessStopped,
            Some(r) => {
                return Err(bad(format!(
                    "{}: {r:?} is not one of no, on-failure, always, unless-stopped",
                    at("restart")
                )));
            }
        };
        let cpus = match &s.cpus {
            None => None,
            Some(c) => Some(
                c.text()
                    .parse::<f64>()
                    .map_err(|_| bad(format!("{}: {:?} is not a number", at("cpus"), c.text())))?,
            ),
        };
        let memory_mb = s
            .mem_limit
            .as_ref()
            .map(|m| memory_mb(&m.text(), &at("mem_limit")))
            .transpose()?;
        let expose = s
            .expose
            .iter()
            .map(|p| {
                let t = p.text();
                t.strip_suffix("/tcp")
                    .unwrap_or(&t)
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| bad(format!("{}: {t:?} is not a TCP port", at("expose"))))
            })
            .collect::<Result<_, _>>()?;
        let mut volumes = Vec::new();
        let mut mounts = Vec::new();
        for v in &s.volumes {
            let parts: Vec<&str> = v.split(':').collect();
            let (source, target, ro) = match parts.as_slice() {
                [s, t] => (*s, *t, None),
                [s, t, "ro"] => (*s, *t, Some(true)),
                [s, t, "rw"] => (*s, *t, Some(false)),
                _ => {
                    return Err(bad(format!(
                        "{}: {v:?}: expected SOURCE:/path[:ro|rw]",
                        at("volumes")
                    )));
                }
            };
            if source.starts_with('/') {
                // A host path: the node's policy decides.
                mounts.push(Mount {
                    source: source.to_string(),
                    target: target.to_string(),
                    read_only: ro,
                });
                continue;
            }
            if source.starts_with(['.', '~']) {
                return Err(bad(format!(
                    "{}: {v:?}: a relative host path means nothing on the node; give an absolute one",
                    at("volumes")
                )));
            }
            if !declared.contains(source) {
                return Err(bad(format!(
                    "{}: volume {source} is not declared under the top-level volumes:",
                    at("volumes")
                )));
            }
            volumes.push(VolumeMount {
                volume: source.to_string(),
                target: target.to_string(),
                read_only: ro == Some(true),
            });
        }
        specs.insert(
            sname.clone(),
            ServiceSpec {
                name: sname.clone(),
                image: s.image.clone(),
                command: s
                    .command
                    .as_ref()
                    .map(|w| words(clone_words(w), &at("command")))
                    .transpose()?,
                entrypoint: s
                    .entrypoint
                    .as_ref()
                    .map(|w| words(clone_words(w), &at("entrypoint")))
                    .transpose()?,
                environment: pairs(&s.environment, &at("environment"))?,
                labels: pairs(&s.labels, &at("labels"))?,
                depends_on,
                healthcheck,
                restart,
                cpus,
                memory_mb,
                pids: s.pids_limit,
                disk_mb: None,
                expose,
                volumes,
                mounts,
            },
        );
    }
    Ok(DeployApply {
        deployment,
        services: start_order(specs)?,
        network_policy,
    })
}

fn clone_words(w: &Words) -> Words {
    match w {
        Words::List(v) => Words::List(v.clone()),
        Words::Line(s) => Words::Line(s.clone()),
    }
}

/// Services with every dependency before its dependants (by name among
/// those ready); a cycle is refused, naming its members.
fn start_order(mut left: BTreeMap<String, ServiceSpec>) -> Result<Vec<ServiceSpec>, ErrorBody> {
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut order = Vec::new();
    while !left.is_empty() {
        let ready: Vec<String> = left
            .iter()
            .filter(|(_, s)| s.depends_on.iter().all(|d| done.contains(&d.service)))
            .map(|(n, _)| n.clone())
            .collect();
        if ready.is_empty() {
            let names: Vec<&str> = left.keys().map(String::as_str).collect();
            return Err(bad(format!(
                "depends_on forms a cycle among: {}",
                names.join(", ")
            )));
        }
        for n in ready {
            let s = left.remove(&n).expect("listed above");
            done.insert(n);
            order.push(s);
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = r#"
name: shop
services:
  web:
    image: busybox
    command: sh -c 'httpd -f -p 80'
    depends_on:
      api:
        condition: service_healthy
    expose: ["80"]
    restart: always
    mem_limit: 64m
    cpus: "0.5"
  api:
    image: busybox
    command: ["sh", "-c", "echo hi"]
    environment:
      MODE: test
      N: 3
    healthcheck:
      test: nc -z localhost 8080
      interval: 500ms
      retries: 5
    volumes: ["data:/data:ro"]
volumes:
  data:
"#;

    #[test]
    fn a_deployment_has_a_bounded_number_of_services() {
        let many = |n: usize| {
            let mut f = String::from("services:\n");
            for i in 0..n {
                f.push_str(&format!("  s{i}:\n    image: i\n"));
                if i > 0 {
                    f.push_str(&format!("    depends_on: [s{}]\n", i - 1));
                }
            }
            f
        };
        let d = parse(&many(crate::protocol::MAX_SERVICES), Some("chain"), None).unwrap();
        assert_eq!(d.services.len(), crate::protocol::MAX_SERVICES);
        let e = parse(
            &many(crate::protocol::MAX_SERVICES + 1),
            Some("chain"),
            None,
        )
        .unwrap_err();
        assert!(e.message.contains("at most"), "{e}");
    }

    #[test]
    fn a_deployment_is_not_named_as_a_sidecar_would_be() {
        for name in ["shop-egress", "shop-relay", "shop-inference"] {
            let e = parse(APP, Some(name), None).unwrap_err();
            assert!(e.message.contains("sidecars"), "{name}: {e}");
        }
        assert!(parse(APP, Some("shop-egresses"), None).is_ok());
    }

    #[test]
    fn a_compose_file_becomes_services_in_start_order() {
        let d = parse(APP, None, None).unwrap();
        assert_eq!(d.deployment, "shop");
        let names: Vec<&str> = d.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["api", "web"]);
        let (api, web) = (&d.services[0], &d.services[1]);
        assert_eq!(
            web.command.as_deref().unwrap(),
            ["sh", "-c", "httpd -f -p 80"]
        );
        assert_eq!(
            web.depends_on[0].condition,
            DependsCondition::ServiceHealthy
        );
        assert_eq!(web.restart, RestartPolicy::Always);
        assert_eq!(
            (web.memory_mb, web.cpus, web.expose.clone()),
            (Some(64), Some(0.5), vec![80])
        );
        assert_eq!(api.environment["N"], "3");
        let h = api.healthcheck.as_ref().unwrap();
        assert_eq!(h.test, ["CMD-SHELL", "nc -z localhost 8080"]);
        assert_eq!((h.interval_ms, h.retries), (Some(500), Some(5)));
        assert!(api.volumes[0].read_only);
        // A host path is the node's to allow or refuse.
        let text = "services:\n  a:\n    image: x\n    volumes: [\"/srv/x:/x:rw\"]\n";
        let m = &parse(text, Some("n"), None).unwrap().services[0].mounts[0];
        assert_eq!((m.source.as_str(), m.read_only), ("/srv/x", Some(false)));
        assert_eq!(parse(APP, Some("other"), None).unwrap().deployment, "other");
    }

    #[test]
    fn the_shipped_example_reads() {
        let d = parse(include_str!("../../examples/deploy.yaml"), None, None).unwrap();
        assert_eq!(d.deployment, "shop");
        let names: Vec<&str> = d.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["db", "api", "web"]);
    }

    #[test]
    fn an_unsupported_key_is_refused_with_its_line() {
        let text = "services:\n  web:\n    image: busybox\n    ports: [\"80:80\"]\n";
        let e = parse(text, Some("x"), None).unwrap_err();
        assert!(e.message.contains("ports"), "{}", e.message);
        assert!(e.message.contains("line 4"), "{}", e.message);
    }

    #[test]
    fn bad_files_are_refused_naming_the_problem() {
        let cases = [
            (
                "services:\n  a:\n    image: x\n    depends_on: [a]\n",
                "cycle",
            ),
            (
                "services:\n  a:\n    image: x\n    depends_on: [b]\n",
                "no service named b",
            ),
            (
                "services:\n  a:\n    image: x\n    volumes: [\"./etc:/x\"]\n",
                "absolute",
            ),
            (
                "services:\n  a:\n    image: x\n    volumes: [\"v:/x\"]\n",
                "not declared",
            ),
            (
                "services:\n  a:\n    image: x\n    restart: sometimes\n",
                "sometimes",
            ),
            ("services:\n  A_b:\n    image: x\n", "A_b"),
            (
                "services:\n  a:\n    image: x\n    mem_limit: lots\n",
                "not a size",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text, Some("x"), None).unwrap_err();
            assert!(e.message.contains(want), "{text}: {}", e.message);
        }
        let e = parse("services:\n  a:\n    image: x\n", None, None).unwrap_err();
        assert!(e.message.contains("needs a name"), "{}", e.message);
    }

    #[test]
    fn command_lines_split_like_a_shell() {
        assert_eq!(
            split_words(r#"sh -c 'echo "a b"' x\ y "q\"z""#).unwrap(),
            ["sh", "-c", "echo \"a b\"", "x y", "q\"z"]
        );
        assert!(split_words("'open").is_err());
    }
}
