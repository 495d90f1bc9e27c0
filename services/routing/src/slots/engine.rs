//! The Redis side of slot claims: one atomic Lua function per operation, all keys under one
//! `{slots}` hash tag. Nothing else writes these keys.
//!
//! The scripts are loaded as one Redis function library (`FUNCTION LOAD`, called with `FCALL`)
//! rather than run with `EVALSHA`: the shared helpers are then created once per load instead
//! of on every call, and a function call has less setup than a script call. With the same
//! Lua, that took a claim from about 92 to 68 µs of server CPU here (deploy/BENCHMARKS.md).
//! Redis keeps the library across restarts only when it persists its data, so a call that
//! finds it missing loads it and tries again, like the `NOSCRIPT` handling of scripts.

use std::{
    sync::{Arc, LazyLock},
    time::Duration,
};

use redis::{ErrorKind, RedisError, ServerErrorKind, aio::ConnectionManager};

use super::{SlotError, UnassignedReason};

const COMMON: &str = include_str!("lua/common.lua");

/// The operations, each a function of the library (the body of `lua/<name>.lua`). Declared in
/// the order of `ALL`, so `op as usize` indexes the library's function names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Claim,
    Assign,
    Confirm,
    Release,
    Config,
    Inspect,
    Repair,
    Rebuild,
}

impl Op {
    const ALL: [Op; 8] = [
        Op::Claim,
        Op::Assign,
        Op::Confirm,
        Op::Release,
        Op::Config,
        Op::Inspect,
        Op::Repair,
        Op::Rebuild,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Claim => "claim",
            Op::Assign => "assign",
            Op::Confirm => "confirm",
            Op::Release => "release",
            Op::Config => "config",
            Op::Inspect => "inspect",
            Op::Repair => "repair",
            Op::Rebuild => "rebuild",
        }
    }

    fn body(self) -> &'static str {
        match self {
            Op::Claim => include_str!("lua/claim.lua"),
            Op::Assign => include_str!("lua/assign.lua"),
            Op::Confirm => include_str!("lua/confirm.lua"),
            Op::Release => include_str!("lua/release.lua"),
            Op::Config => include_str!("lua/config.lua"),
            Op::Inspect => include_str!("lua/inspect.lua"),
            Op::Repair => include_str!("lua/repair.lua"),
            Op::Rebuild => include_str!("lua/rebuild.lua"),
        }
    }
}

/// The slot function library as it is loaded into Redis.
#[derive(Debug)]
pub struct SlotLibrary {
    name: String,
    source: String,
    functions: [String; Op::ALL.len()],
}

impl SlotLibrary {
    /// `shopctrl_slots_<hash of the code>`: a new version gets a new name (and new function
    /// names, which Redis requires to be unique across libraries), so replicas running
    /// different versions against one Redis never replace each other's library.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The text given to `FUNCTION LOAD`; `deploy/bench-routing-slots.sh` builds the same.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn function(&self, op: Op) -> &str {
        &self.functions[op as usize]
    }
}

/// The library text for `name`: the helpers, then each script as the body of a function
/// `<name>_<script>(KEYS, ARGV)` that first hands its key and prefix to the helpers.
fn library_source(name: &str) -> String {
    let mut source = format!("#!lua name={name}\n{COMMON}\n");
    for op in Op::ALL {
        source.push_str(&format!(
            "redis.register_function('{name}_{op}', function(KEYS, ARGV)\nbegin(KEYS, ARGV)\n{body}\nend)\n",
            op = op.name(),
            body = op.body(),
        ));
    }
    source
}

static LIBRARY: LazyLock<SlotLibrary> = LazyLock::new(|| {
    // The redis crate's script hash (SHA-1) serves as a content hash; no extra dependency.
    let hash = redis::Script::new(&library_source(""))
        .get_hash()
        .to_owned();
    let name = format!("shopctrl_slots_{}", hash.get(..16).unwrap_or(&hash));
    SlotLibrary {
        source: library_source(&name),
        functions: Op::ALL.map(|op| format!("{name}_{}", op.name())),
        name,
    }
});

/// The slot library of this build.
pub fn library() -> &'static SlotLibrary {
    &LIBRARY
}

/// How many times a call loads the library when Redis says it is missing (someone may delete
/// it again in between; more than that is not a restart but a fault).
const LOAD_ATTEMPTS: usize = 3;

fn function_missing(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
        && error
            .detail()
            .is_some_and(|d| d.starts_with("Function not found"))
}

fn library_exists(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
        && error
            .detail()
            .is_some_and(|d| d.starts_with("Library") && d.contains("already exists"))
}

/// An automatic or manual claim that took a slot (still pending until confirmed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub employee_id: String,
    /// The Redis data epoch the claim was made under; the commit is fenced on it.
    pub epoch: i64,
    /// The employee's open conversations across all shops just before this claim.
    pub open_before: u32,
    /// The shop's slot limit at that moment.
    pub slots: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    Claimed(Claimed),
    /// The conversation already has a claim (committed, or pending from another attempt).
    Existing {
        employee_id: String,
        epoch: i64,
        pending: bool,
    },
    Unassigned {
        reason: UnassignedReason,
        epoch: i64,
    },
    /// Redis lost its data: nothing can be claimed until it is rebuilt from PostgreSQL.
    Rebuild,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignOutcome {
    Claimed {
        claim: Claimed,
        over_limit: bool,
        /// Who held the conversation before (a transfer).
        previous: Option<String>,
    },
    Existing {
        employee_id: String,
        epoch: i64,
    },
    /// Another claim on the conversation is in flight.
    Busy {
        employee_id: String,
    },
    NoPermission,
    Full {
        open: u32,
        slots: u32,
    },
    Rebuild,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseMode {
    /// The conversation left the employee for good (closed, handed back, transferred away).
    Close,
    /// Undo a claim whose PostgreSQL commit failed (only a pending claim is undone).
    Rollback,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    Nothing,
    Released {
        employee_id: String,
        open_after: u32,
    },
    /// A transfer that did not commit: the previous owner keeps the conversation.
    Restored {
        previous: String,
    },
    Rebuild,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmOutcome {
    Confirmed,
    /// Redis lost its data after the commit; the rebuild reads the commit from PostgreSQL.
    Rebuild,
}

/// What Redis holds for one employee (for the drift check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmployeeState {
    pub version: String,
    pub live_pending: u32,
    pub open: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildStart {
    /// The data is present (someone finished the rebuild).
    Done,
    /// We hold the lease and must rebuild.
    Lease,
    /// Someone else is rebuilding.
    Busy,
}

/// The slot engine: a handle on Redis with the slot functions. Cheap to clone.
#[derive(Clone)]
pub struct SlotEngine {
    conn: ConnectionManager,
    prefix: Arc<str>,
    /// The state hash (`<prefix>st`), the key every function declares.
    state_key: Arc<str>,
    pending_ttl_ms: u64,
    library: &'static SlotLibrary,
}

impl SlotEngine {
    /// Connects to `redis_url`; every key lives under `<key_prefix>{slots}:`. A claim not
    /// confirmed within `pending_ttl` stops counting.
    pub async fn connect(
        redis_url: &str,
        key_prefix: &str,
        pending_ttl: Duration,
    ) -> Result<Self, SlotError> {
        let client = redis::Client::open(redis_url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Self::new(conn, key_prefix, pending_ttl))
    }

    pub fn new(conn: ConnectionManager, key_prefix: &str, pending_ttl: Duration) -> Self {
        let prefix = format!("{key_prefix}{{slots}}:");
        let state_key = format!("{prefix}st");
        Self {
            conn,
            prefix: prefix.into(),
            state_key: state_key.into(),
            pending_ttl_ms: pending_ttl.as_millis().max(1) as u64,
            library: library(),
        }
    }

    /// The full key prefix, hash tag included.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    async fn run(&self, op: Op, args: &[&str]) -> Result<Vec<String>, SlotError> {
        let mut conn = self.conn.clone();
        let mut loads = 0;
        loop {
            let reply: Result<Vec<String>, RedisError> = redis::cmd("FCALL")
                .arg(self.library.function(op))
                .arg(1)
                .arg(&*self.state_key)
                .arg(&*self.prefix)
                .arg(args)
                .query_async(&mut conn)
                .await;
            match reply {
                Err(error) if function_missing(&error) && loads < LOAD_ATTEMPTS => {
                    loads += 1;
                    self.load_library(&mut conn).await?;
                }
                reply => return Ok(reply?),
            }
        }
    }

    /// Loads the library (after a restart without persistence, a `FUNCTION FLUSH`, a new
    /// server). Another replica loading it at the same time is fine.
    async fn load_library(&self, conn: &mut ConnectionManager) -> Result<(), SlotError> {
        tracing::info!(
            library = self.library.name(),
            "loading the slot functions into Redis"
        );
        let loaded: Result<String, RedisError> = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg(self.library.source())
            .query_async(conn)
            .await;
        match loaded {
            Err(error) if !library_exists(&error) => Err(error.into()),
            _ => Ok(()),
        }
    }

    /// The automatic claim for a conversation of `shop_id` (see `lua/claim.lua`).
    pub async fn claim(
        &self,
        conversation_id: &str,
        shop_id: &str,
        customer_id: &str,
    ) -> Result<ClaimOutcome, SlotError> {
        let ttl = self.pending_ttl_ms.to_string();
        let r = self
            .run(Op::Claim, &[conversation_id, shop_id, customer_id, &ttl])
            .await?;
        match head(&r)? {
            "rebuild" => Ok(ClaimOutcome::Rebuild),
            "existing" => Ok(ClaimOutcome::Existing {
                employee_id: field(&r, 1)?.to_owned(),
                epoch: num(&r, 2)?,
                pending: field(&r, 3)? == "1",
            }),
            "none" => Ok(ClaimOutcome::Unassigned {
                reason: UnassignedReason::parse(field(&r, 1)?)
                    .ok_or_else(|| SlotError::Protocol(format!("unknown reason in {r:?}")))?,
                epoch: num(&r, 2)?,
            }),
            "claimed" => Ok(ClaimOutcome::Claimed(Claimed {
                employee_id: field(&r, 1)?.to_owned(),
                epoch: num(&r, 2)?,
                open_before: num(&r, 3)?,
                slots: num(&r, 4)?,
            })),
            _ => Err(SlotError::Protocol(format!("claim answered {r:?}"))),
        }
    }

    /// Manual assignment or transfer (see `lua/assign.lua`).
    pub async fn assign(
        &self,
        conversation_id: &str,
        shop_id: &str,
        employee_id: &str,
        force: bool,
        customer_id: &str,
    ) -> Result<AssignOutcome, SlotError> {
        let ttl = self.pending_ttl_ms.to_string();
        let force = if force { "1" } else { "0" };
        let r = self
            .run(
                Op::Assign,
                &[
                    conversation_id,
                    shop_id,
                    employee_id,
                    force,
                    &ttl,
                    customer_id,
                ],
            )
            .await?;
        match head(&r)? {
            "rebuild" => Ok(AssignOutcome::Rebuild),
            "existing" => Ok(AssignOutcome::Existing {
                employee_id: field(&r, 1)?.to_owned(),
                epoch: num(&r, 2)?,
            }),
            "busy" => Ok(AssignOutcome::Busy {
                employee_id: field(&r, 1)?.to_owned(),
            }),
            "no_permission" => Ok(AssignOutcome::NoPermission),
            "full" => Ok(AssignOutcome::Full {
                open: num(&r, 1)?,
                slots: num(&r, 2)?,
            }),
            "claimed" => {
                let previous = field(&r, 6)?;
                Ok(AssignOutcome::Claimed {
                    claim: Claimed {
                        employee_id: field(&r, 1)?.to_owned(),
                        epoch: num(&r, 2)?,
                        open_before: num(&r, 3)?,
                        slots: num(&r, 4)?,
                    },
                    over_limit: field(&r, 5)? == "1",
                    previous: (!previous.is_empty()).then(|| previous.to_owned()),
                })
            }
            _ => Err(SlotError::Protocol(format!("assign answered {r:?}"))),
        }
    }

    /// The assignment is committed in PostgreSQL: Redis follows (idempotent).
    pub async fn confirm(
        &self,
        conversation_id: &str,
        employee_id: &str,
        shop_id: &str,
    ) -> Result<ConfirmOutcome, SlotError> {
        let r = self
            .run(Op::Confirm, &[conversation_id, employee_id, shop_id])
            .await?;
        match head(&r)? {
            "rebuild" => Ok(ConfirmOutcome::Rebuild),
            "ok" => Ok(ConfirmOutcome::Confirmed),
            _ => Err(SlotError::Protocol(format!("confirm answered {r:?}"))),
        }
    }

    /// Gives back a conversation's slot; `expected` limits it to that employee's claim.
    pub async fn release(
        &self,
        conversation_id: &str,
        expected: Option<&str>,
        mode: ReleaseMode,
    ) -> Result<ReleaseOutcome, SlotError> {
        let mode = match mode {
            ReleaseMode::Close => "close",
            ReleaseMode::Rollback => "rollback",
        };
        let r = self
            .run(
                Op::Release,
                &[conversation_id, expected.unwrap_or(""), mode],
            )
            .await?;
        match head(&r)? {
            "rebuild" => Ok(ReleaseOutcome::Rebuild),
            "none" => Ok(ReleaseOutcome::Nothing),
            "released" => Ok(ReleaseOutcome::Released {
                employee_id: field(&r, 1)?.to_owned(),
                open_after: num(&r, 2)?,
            }),
            "restored" => Ok(ReleaseOutcome::Restored {
                previous: field(&r, 1)?.to_owned(),
            }),
            _ => Err(SlotError::Protocol(format!("release answered {r:?}"))),
        }
    }

    async fn config(&self, op: &str, a: &str, b: &str) -> Result<bool, SlotError> {
        let r = self.run(Op::Config, &[op, a, b]).await?;
        match head(&r)? {
            "ok" => Ok(true),
            "rebuild" => Ok(false),
            _ => Err(SlotError::Protocol(format!("config answered {r:?}"))),
        }
    }

    /// Sets a shop's slot limit. `false` means Redis needs a rebuild (which reads the value
    /// from PostgreSQL, so writing PostgreSQL first is enough).
    pub async fn set_slots(&self, shop_id: &str, slots: u32) -> Result<bool, SlotError> {
        self.config("slots", shop_id, &slots.to_string()).await
    }

    /// Adds or removes an employee from a shop's candidates (the Chat permission).
    pub async fn set_candidate(
        &self,
        shop_id: &str,
        employee_id: &str,
        candidate: bool,
    ) -> Result<bool, SlotError> {
        let op = if candidate { "grant" } else { "revoke" };
        self.config(op, shop_id, employee_id).await
    }

    /// Online (present) or away/offline.
    pub async fn set_present(&self, employee_id: &str, present: bool) -> Result<bool, SlotError> {
        let op = if present { "present" } else { "away" };
        self.config(op, employee_id, "").await
    }

    /// What Redis holds for an employee; `None` when Redis needs a rebuild.
    pub async fn inspect(&self, employee_id: &str) -> Result<Option<EmployeeState>, SlotError> {
        let r = self.run(Op::Inspect, &[employee_id]).await?;
        match head(&r)? {
            "rebuild" => Ok(None),
            "ok" => Ok(Some(EmployeeState {
                version: field(&r, 1)?.to_owned(),
                live_pending: num(&r, 2)?,
                open: r[3..].to_vec(),
            })),
            _ => Err(SlotError::Protocol(format!("inspect answered {r:?}"))),
        }
    }

    /// Replaces an employee's committed conversations (pairs of conversation, shop) when
    /// nothing changed since `version`. Returns (added, removed), or `None` when skipped.
    pub async fn repair(
        &self,
        employee_id: &str,
        version: &str,
        open: &[(String, String)],
    ) -> Result<Option<(u32, u32)>, SlotError> {
        let mut args: Vec<&str> = vec![employee_id, version];
        for (conversation, shop) in open {
            args.push(conversation);
            args.push(shop);
        }
        let r = self.run(Op::Repair, &args).await?;
        match head(&r)? {
            "rebuild" | "skipped" => Ok(None),
            "repaired" => Ok(Some((num(&r, 1)?, num(&r, 2)?))),
            _ => Err(SlotError::Protocol(format!("repair answered {r:?}"))),
        }
    }

    /// Tries to take the rebuild lease.
    pub async fn rebuild_begin(
        &self,
        token: &str,
        lease: Duration,
    ) -> Result<RebuildStart, SlotError> {
        let ms = lease.as_millis().max(1).to_string();
        let r = self.run(Op::Rebuild, &["begin", token, &ms]).await?;
        match head(&r)? {
            "done" => Ok(RebuildStart::Done),
            "lease" => Ok(RebuildStart::Lease),
            "busy" => Ok(RebuildStart::Busy),
            _ => Err(SlotError::Protocol(format!("rebuild begin answered {r:?}"))),
        }
    }

    /// One loading step of a rebuild (`op` and arguments as in `lua/rebuild.lua`).
    pub(crate) async fn rebuild_step(
        &self,
        token: &str,
        op: &str,
        args: &[&str],
    ) -> Result<(), SlotError> {
        let mut all: Vec<&str> = vec![op, token];
        all.extend_from_slice(args);
        let r = self.run(Op::Rebuild, &all).await?;
        match head(&r)? {
            "ok" => Ok(()),
            "lost" | "done" => Err(SlotError::LeaseLost),
            _ => Err(SlotError::Protocol(format!("rebuild {op} answered {r:?}"))),
        }
    }

    /// Deletes every slot key except the lease, before a rebuild loads fresh data. Uses SCAN
    /// (on a cluster: run against the node owning the `{slots}` slot).
    pub(crate) async fn clear_for_rebuild(&self) -> Result<(), SlotError> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}*", escape_glob(&self.prefix));
        let lease = format!("{}lease", self.prefix);
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            let keys: Vec<String> = keys.into_iter().filter(|k| *k != lease).collect();
            if !keys.is_empty() {
                let _: i64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

fn escape_glob(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn head(r: &[String]) -> Result<&str, SlotError> {
    field(r, 0)
}

fn field(r: &[String], i: usize) -> Result<&str, SlotError> {
    r.get(i)
        .map(String::as_str)
        .ok_or_else(|| SlotError::Protocol(format!("short script reply {r:?}")))
}

fn num<T: std::str::FromStr>(r: &[String], i: usize) -> Result<T, SlotError> {
    field(r, i)?
        .parse()
        .map_err(|_| SlotError::Protocol(format!("not a number at {i} in {r:?}")))
}

#[cfg(test)]
mod tests {
    //! The engine against the local Redis (own key prefix, see `shopctrl_testkit`): the
    //! library's life cycle and one pass through every function. The rules themselves are
    //! proven in `tests/slots_proof.rs`.
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use shopctrl_testkit::TestRedis;

    use super::*;

    async fn engine(redis: &TestRedis, pending_ttl: Duration) -> SlotEngine {
        SlotEngine::connect(redis.url(), redis.prefix(), pending_ttl)
            .await
            .unwrap()
    }

    /// Loads the data as a rebuild from a record with one shop would.
    async fn rebuild(e: &SlotEngine, epoch: i64, shop: &str, slots: u32, candidates: &[&str]) {
        let lease = e.rebuild_begin("t", Duration::from_secs(10)).await.unwrap();
        assert_eq!(lease, RebuildStart::Lease);
        let slots = slots.to_string();
        let mut args = vec![shop, slots.as_str()];
        args.extend_from_slice(candidates);
        e.rebuild_step("t", "shop", &args).await.unwrap();
        e.rebuild_step("t", "finish", &[&epoch.to_string()])
            .await
            .unwrap();
    }

    async fn delete_library(conn: &mut redis::aio::MultiplexedConnection) {
        // Another test may have deleted it already: either way it is gone.
        let _: Result<(), RedisError> = redis::cmd("FUNCTION")
            .arg("DELETE")
            .arg(library().name())
            .query_async(conn)
            .await;
    }

    fn claimed(outcome: ClaimOutcome) -> Claimed {
        match outcome {
            ClaimOutcome::Claimed(claim) => claim,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn slots_library_is_reloaded_after_redis_lost_it() {
        let redis = TestRedis::create().await;
        let e = engine(&redis, Duration::from_secs(15)).await;
        let mut conn = redis.connection().await;

        // A server that never saw the library (or restarted without persistence).
        delete_library(&mut conn).await;
        assert_eq!(
            e.claim("c0", "s1", "").await.unwrap(),
            ClaimOutcome::Rebuild
        );
        rebuild(&e, 7, "s1", 2, &["a", "b"]).await;

        // Lost again between two calls: the next call loads it and goes on.
        delete_library(&mut conn).await;
        let claim = claimed(e.claim("c1", "s1", "u1").await.unwrap());
        assert_eq!((claim.employee_id.as_str(), claim.epoch), ("a", 7));
        let listed: Vec<redis::Value> = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg(library().name())
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!listed.is_empty(), "the library is loaded again");

        // Data and library lost together (a restart without persistence): rebuild.
        redis.delete_all().await;
        delete_library(&mut conn).await;
        assert_eq!(
            e.claim("c2", "s1", "u1").await.unwrap(),
            ClaimOutcome::Rebuild
        );
        assert_eq!(e.inspect("a").await.unwrap(), None);
    }

    #[tokio::test]
    async fn slots_every_function_on_the_packed_layout() {
        let redis = TestRedis::create().await;
        let e = engine(&redis, Duration::from_secs(15)).await;
        rebuild(&e, 3, "s1", 2, &["b", "a"]).await;

        // Never assigned, equally loaded: the smaller id.
        let c1 = claimed(e.claim("c1", "s1", "u1").await.unwrap());
        assert_eq!(
            (c1.employee_id.as_str(), c1.open_before, c1.slots),
            ("a", 0, 2)
        );
        assert_eq!(
            e.claim("c1", "s1", "u1").await.unwrap(),
            ClaimOutcome::Existing {
                employee_id: "a".into(),
                epoch: 3,
                pending: true
            }
        );
        assert_eq!(
            e.confirm("c1", "a", "s1").await.unwrap(),
            ConfirmOutcome::Confirmed
        );
        // Least loaded.
        let c2 = claimed(e.claim("c2", "s1", "u2").await.unwrap());
        assert_eq!(c2.employee_id, "b");
        e.confirm("c2", "b", "s1").await.unwrap();
        // Both hold one and a is idle longer, but u2 goes back to b.
        let c3 = claimed(e.claim("c3", "s1", "u2").await.unwrap());
        assert_eq!((c3.employee_id.as_str(), c3.open_before), ("b", 1));
        e.confirm("c3", "b", "s1").await.unwrap();
        // b is full (2 of 2): a, even for b's customer.
        let c4 = claimed(e.claim("c4", "s1", "u2").await.unwrap());
        assert_eq!(c4.employee_id, "a");
        assert_eq!(
            e.claim("c5", "s1", "").await.unwrap(),
            ClaimOutcome::Unassigned {
                reason: UnassignedReason::AllFull,
                epoch: 3
            }
        );

        // A failed commit gives the slot back; a close frees one.
        assert_eq!(
            e.release("c4", Some("a"), ReleaseMode::Rollback)
                .await
                .unwrap(),
            ReleaseOutcome::Released {
                employee_id: "a".into(),
                open_after: 1
            }
        );
        assert_eq!(
            e.release("c2", None, ReleaseMode::Close).await.unwrap(),
            ReleaseOutcome::Released {
                employee_id: "b".into(),
                open_after: 1
            }
        );

        // Manual transfer of c1 from a to b, rolled back: a keeps it.
        let AssignOutcome::Claimed { previous, .. } =
            e.assign("c1", "s1", "b", false, "u1").await.unwrap()
        else {
            panic!("transfer refused");
        };
        assert_eq!(previous.as_deref(), Some("a"));
        assert_eq!(
            e.assign("c1", "s1", "a", false, "u1").await.unwrap(),
            AssignOutcome::Busy {
                employee_id: "b".into()
            }
        );
        assert_eq!(
            e.release("c1", Some("b"), ReleaseMode::Rollback)
                .await
                .unwrap(),
            ReleaseOutcome::Restored {
                previous: "a".into()
            }
        );

        // Presence, permission and the limit.
        assert!(e.set_present("a", false).await.unwrap());
        assert!(e.set_present("b", false).await.unwrap());
        assert_eq!(
            e.claim("c6", "s1", "").await.unwrap(),
            ClaimOutcome::Unassigned {
                reason: UnassignedReason::AllAway,
                epoch: 3
            }
        );
        assert!(e.set_present("a", true).await.unwrap());
        assert!(e.set_candidate("s1", "a", false).await.unwrap());
        assert_eq!(
            e.assign("c6", "s1", "a", false, "").await.unwrap(),
            AssignOutcome::NoPermission
        );
        assert!(e.set_candidate("s1", "b", false).await.unwrap());
        assert_eq!(
            e.claim("c6", "s1", "").await.unwrap(),
            ClaimOutcome::Unassigned {
                reason: UnassignedReason::NoPermission,
                epoch: 3
            }
        );
        assert!(e.set_candidate("s1", "a", true).await.unwrap());
        assert!(e.set_slots("s1", 0).await.unwrap());
        assert_eq!(
            e.claim("c6", "s1", "").await.unwrap(),
            ClaimOutcome::Unassigned {
                reason: UnassignedReason::SlotsZero,
                epoch: 3
            }
        );
        assert!(e.set_slots("s1", 5).await.unwrap());
        assert_eq!(claimed(e.claim("c6", "s1", "").await.unwrap()).slots, 5);

        // The drift check's view and a repair.
        let state = e.inspect("a").await.unwrap().unwrap();
        assert_eq!(state.live_pending, 1);
        let mut open = state.open.clone();
        open.sort();
        assert_eq!(open, ["c1"]);
        assert_eq!(e.repair("a", &state.version, &[]).await.unwrap(), None);
        e.release("c6", Some("a"), ReleaseMode::Rollback)
            .await
            .unwrap();
        let state = e.inspect("a").await.unwrap().unwrap();
        let record = [("c7".to_owned(), "s1".to_owned())];
        assert_eq!(
            e.repair("a", &state.version, &record).await.unwrap(),
            Some((1, 1))
        );
        assert_eq!(e.inspect("a").await.unwrap().unwrap().open, ["c7"]);
    }

    #[tokio::test]
    async fn slots_expired_claims_stop_counting_and_are_deleted() {
        let redis = TestRedis::create().await;
        let e = engine(&redis, Duration::from_millis(200)).await;
        rebuild(&e, 1, "s1", 1, &["a"]).await;
        let field = |c: &str| format!("c:{c}");
        let state_key = format!("{}st", e.key_prefix());
        let mut conn = redis.connection().await;

        claimed(e.claim("c1", "s1", "").await.unwrap());
        // Full until c1's claim expires.
        assert!(matches!(
            e.claim("c2", "s1", "").await.unwrap(),
            ClaimOutcome::Unassigned {
                reason: UnassignedReason::AllFull,
                ..
            }
        ));
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Expired: a is free again (the limit is 1).
        assert_eq!(
            claimed(e.claim("c3", "s1", "").await.unwrap()).employee_id,
            "a"
        );
        // Within the grace a rollback still finds the expired claim, as when it was a key
        // expiring a second after the claim.
        assert!(matches!(
            e.release("c1", Some("a"), ReleaseMode::Rollback)
                .await
                .unwrap(),
            ReleaseOutcome::Released { .. }
        ));
        tokio::time::sleep(Duration::from_millis(1300)).await;
        // Past the grace: gone for everyone, and the drift check's purge deleted it.
        let before: bool = redis::cmd("HEXISTS")
            .arg(&state_key)
            .arg(field("c3"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(before);
        assert_eq!(e.inspect("a").await.unwrap().unwrap().live_pending, 0);
        let after: bool = redis::cmd("HEXISTS")
            .arg(&state_key)
            .arg(field("c3"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!after);
        assert_eq!(
            e.release("c3", Some("a"), ReleaseMode::Rollback)
                .await
                .unwrap(),
            ReleaseOutcome::Nothing
        );
    }
}
