//! The consumer's side of Redis: a connection of its own and the consumer-group commands it sends over it.
//!
//! Replies carrying entries are read from the raw [`Value`], not into a map of strings, so that an entry with a
//! field that is not UTF-8 or one deleted while pending (`[id, nil]`) is still an [`Entry`] the consumer can
//! dead-letter, instead of a reply that fails to parse on every read and stalls the group.

use std::{collections::HashMap, time::Duration};

use redis::{
    AsyncCommands, AsyncConnectionConfig, Value,
    aio::MultiplexedConnection,
    streams::{StreamAutoClaimOptions, StreamInfoGroupsReply, StreamPendingCountReply, StreamReadOptions},
};

use super::Config;
use crate::NotificationError;

/// Dead-letter field: why the entry was not processed.
pub const DEAD_LETTER_REASON: &str = "dead_letter_reason";
/// Dead-letter field: how often the entry had been delivered.
pub const DEAD_LETTER_DELIVERIES: &str = "dead_letter_deliveries";
/// Dead-letter field: the entry's id on the stream it came from.
pub const DEAD_LETTER_ORIGINAL_ID: &str = "dead_letter_original_id";
/// Dead-letter field: the stream it came from.
pub const DEAD_LETTER_ORIGINAL_STREAM: &str = "dead_letter_original_stream";

const DEAD_LETTER_FIELDS: [&str; 4] =
    [DEAD_LETTER_REASON, DEAD_LETTER_DELIVERIES, DEAD_LETTER_ORIGINAL_ID, DEAD_LETTER_ORIGINAL_STREAM];

/// Most entries one command returns.
const BATCH: usize = 64;
/// Longest a connection attempt waits.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much longer than its `BLOCK` time a read may take before the server counts as gone.
const REPLY_GRACE: Duration = Duration::from_secs(5);

/// A stream entry as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry id.
    pub id: String,
    /// Its fields in order, or `None` when the entry was deleted from the stream while it was pending.
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

/// One consumer's connection to its group.
pub struct Group<'a> {
    conn: MultiplexedConnection,
    config: &'a Config,
}

impl<'a> Group<'a> {
    /// Opens a connection used by nobody else, so that a blocking read stalls no other command, and makes sure the
    /// group exists.
    pub async fn join(redis: &redis::Client, config: &'a Config) -> Result<Self, NotificationError> {
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(config.block + REPLY_GRACE));
        let mut conn = redis
            .get_multiplexed_async_connection_with_config(&connection)
            .await
            .map_err(NotificationError::redis("connect"))?;
        // Named after the consumer, so `CLIENT LIST` tells which connection is which replica's.
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(client_name(&config.consumer))
            .query_async::<()>(&mut conn)
            .await
            .map_err(NotificationError::redis("name its connection"))?;
        let mut group = Self { conn, config };
        group.create().await?;
        Ok(group)
    }

    /// Creates the group (and the stream) unless it exists. It starts at the beginning of the stream, so events
    /// written before the first consumer ever started are delivered too.
    async fn create(&mut self) -> Result<(), NotificationError> {
        let created: Result<(), _> =
            self.conn.xgroup_create_mkstream(&self.config.stream, &self.config.group, "0").await;
        match created {
            Err(err) if err.code() != Some("BUSYGROUP") => {
                Err(NotificationError::redis("create the consumer group")(err))
            }
            _ => Ok(()),
        }
    }

    fn read_options(&self) -> StreamReadOptions {
        StreamReadOptions::default().group(&self.config.group, &self.config.consumer).count(BATCH)
    }

    /// This consumer's pending entries (read before but not acknowledged) after the id `after`; `0` for the first.
    pub async fn read_pending(&mut self, after: &str) -> Result<Vec<Entry>, NotificationError> {
        let options = self.read_options();
        let reply: Value = self
            .conn
            .xread_options(&[&self.config.stream], &[after], &options)
            .await
            .map_err(NotificationError::redis("read its pending entries"))?;
        read_reply(reply)
    }

    /// Entries never delivered to the group, waiting up to `block` for some to arrive.
    pub async fn read_new(&mut self, block: Duration) -> Result<Vec<Entry>, NotificationError> {
        let options = self.read_options().block(millis(block));
        let reply: Value = self
            .conn
            .xread_options(&[&self.config.stream], &[">"], &options)
            .await
            .map_err(NotificationError::redis("read new entries"))?;
        read_reply(reply)
    }

    /// Takes over entries of any consumer in the group pending longer than the claim idle time, from `cursor`
    /// (`0-0` first). Returns the cursor to continue from (`0-0` when the whole list was scanned) and the
    /// entries, including those deleted from the stream in the meantime.
    pub async fn claim(&mut self, cursor: &str) -> Result<(String, Vec<Entry>), NotificationError> {
        let reply: Value = self
            .conn
            .xautoclaim_options(
                &self.config.stream,
                &self.config.group,
                &self.config.consumer,
                millis(self.config.claim_min_idle),
                cursor,
                StreamAutoClaimOptions::default().count(BATCH),
            )
            .await
            .map_err(NotificationError::redis("claim idle entries"))?;
        claim_reply(reply)
    }

    /// How often each of `entries` (pending ones of this consumer) has been delivered, in one round trip.
    pub async fn deliveries(&mut self, entries: &[Entry]) -> Result<HashMap<String, u64>, NotificationError> {
        if entries.is_empty() {
            return Ok(HashMap::new());
        }
        let mut pipe = redis::pipe();
        for entry in entries {
            pipe.xpending_consumer_count(
                &self.config.stream,
                &self.config.group,
                &entry.id,
                &entry.id,
                1,
                &self.config.consumer,
            );
        }
        let replies: Vec<StreamPendingCountReply> =
            pipe.query_async(&mut self.conn).await.map_err(NotificationError::redis("count deliveries"))?;
        Ok(replies
            .into_iter()
            .flat_map(|reply| reply.ids)
            .map(|pending| (pending.id, pending.times_delivered as u64))
            .collect())
    }

    /// Acknowledges the entry `id`: the group is done with it.
    pub async fn ack(&mut self, id: &str) -> Result<(), NotificationError> {
        let _: u64 = self
            .conn
            .xack(&self.config.stream, &self.config.group, &[id])
            .await
            .map_err(NotificationError::redis("acknowledge an entry"))?;
        Ok(())
    }

    /// Copies `entry` to the dead-letter stream with why and after how many deliveries, then acknowledges it. The
    /// two are not one transaction, because Redis would run the acknowledgement even when the copy failed; a crash
    /// between them leaves a second copy instead of none.
    pub async fn dead_letter(&mut self, entry: &Entry, deliveries: u64, reason: &str) -> Result<(), NotificationError> {
        let deliveries = deliveries.to_string();
        let fields = dead_letter_fields(entry, &self.config.stream, &deliveries, reason);
        let _: String = self
            .conn
            .xadd(&self.config.dead_letter_stream, "*", &fields)
            .await
            .map_err(NotificationError::redis("write to the dead-letter stream"))?;
        self.ack(&entry.id).await
    }

    /// The group's pending entries and its lag (entries not yet delivered; unknown after some deletions).
    pub async fn backlog(&mut self) -> Result<(u64, Option<u64>), NotificationError> {
        let reply: StreamInfoGroupsReply = self
            .conn
            .xinfo_groups(&self.config.stream)
            .await
            .map_err(NotificationError::redis("describe the group"))?;
        let group = reply.groups.into_iter().find(|group| group.name == self.config.group).ok_or_else(|| {
            NotificationError::Reply { command: "XINFO GROUPS", detail: format!("no group {}", self.config.group) }
        })?;
        Ok((group.pending as u64, group.lag.map(|lag| lag as u64)))
    }
}

/// The dead-letter entry: the reason fields first, then the original fields unchanged (bar any that would
/// impersonate the reason fields).
fn dead_letter_fields<'e>(
    entry: &'e Entry,
    stream: &'e str,
    deliveries: &'e str,
    reason: &'e str,
) -> Vec<(&'e [u8], &'e [u8])> {
    let mut fields: Vec<(&[u8], &[u8])> = vec![
        (DEAD_LETTER_REASON.as_bytes(), reason.as_bytes()),
        (DEAD_LETTER_DELIVERIES.as_bytes(), deliveries.as_bytes()),
        (DEAD_LETTER_ORIGINAL_ID.as_bytes(), entry.id.as_bytes()),
        (DEAD_LETTER_ORIGINAL_STREAM.as_bytes(), stream.as_bytes()),
    ];
    let original = entry.fields.iter().flatten();
    fields.extend(
        original
            .filter(|(name, _)| !DEAD_LETTER_FIELDS.iter().any(|reserved| reserved.as_bytes() == name.as_slice()))
            .map(|(name, value)| (name.as_slice(), value.as_slice())),
    );
    fields
}

/// The connection name of `consumer`: Redis refuses names with spaces or control characters.
fn client_name(consumer: &str) -> String {
    consumer.chars().map(|c| if c.is_ascii_graphic() { c } else { '_' }).collect()
}

fn millis(duration: Duration) -> usize {
    usize::try_from(duration.as_millis()).unwrap_or(usize::MAX)
}

fn malformed(command: &'static str, detail: impl Into<String>) -> NotificationError {
    NotificationError::Reply { command, detail: detail.into() }
}

/// The entries of an `XREADGROUP` reply for one stream: nil when a blocking read timed out, else the stream's
/// entries keyed by its name (an array of pairs in RESP2, a map in RESP3).
fn read_reply(reply: Value) -> Result<Vec<Entry>, NotificationError> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(streams) => streams,
        Value::Array(streams) => streams
            .into_iter()
            .map(|stream| match stream {
                Value::Array(pair) if pair.len() == 2 => {
                    let mut pair = pair.into_iter();
                    Ok((pair.next().unwrap_or_default(), pair.next().unwrap_or_default()))
                }
                other => Err(malformed("XREADGROUP", format!("a stream is {other:?}, not [name, entries]"))),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(malformed("XREADGROUP", format!("{other:?} is not a list of streams"))),
    };
    let mut entries = Vec::new();
    for (_, stream_entries) in streams {
        entries.extend(entry_list("XREADGROUP", stream_entries)?);
    }
    Ok(entries)
}

/// An `XAUTOCLAIM` reply: `[cursor, entries, deleted ids]` (Redis 7; 6.2 sends no deleted ids).
fn claim_reply(reply: Value) -> Result<(String, Vec<Entry>), NotificationError> {
    let Value::Array(parts) = reply else {
        return Err(malformed("XAUTOCLAIM", format!("{reply:?} is not [cursor, entries, deleted]")));
    };
    let mut parts = parts.into_iter();
    let cursor = text("XAUTOCLAIM", parts.next().unwrap_or_default())?;
    let mut entries = entry_list("XAUTOCLAIM", parts.next().unwrap_or(Value::Array(Vec::new())))?;
    if let Some(Value::Array(deleted)) = parts.next() {
        for id in deleted {
            entries.push(Entry { id: text("XAUTOCLAIM", id)?, fields: None });
        }
    }
    Ok((cursor, entries))
}

fn entry_list(command: &'static str, list: Value) -> Result<Vec<Entry>, NotificationError> {
    let Value::Array(list) = list else {
        return Err(malformed(command, format!("{list:?} is not a list of entries")));
    };
    list.into_iter().map(|entry| entry_of(command, entry)).collect()
}

/// One entry, `[id, [field, value, …]]`, or `[id, nil]` for one deleted while pending.
fn entry_of(command: &'static str, entry: Value) -> Result<Entry, NotificationError> {
    let Value::Array(parts) = entry else {
        return Err(malformed(command, format!("an entry is {entry:?}, not [id, fields]")));
    };
    let mut parts = parts.into_iter();
    let id = text(command, parts.next().unwrap_or_default())?;
    let fields = match parts.next().unwrap_or_default() {
        Value::Nil => None,
        Value::Array(flat) if flat.len() % 2 == 0 => {
            let mut flat = flat.into_iter();
            let mut fields = Vec::new();
            while let (Some(name), Some(value)) = (flat.next(), flat.next()) {
                fields.push((bytes(command, name)?, bytes(command, value)?));
            }
            Some(fields)
        }
        Value::Map(pairs) => Some(
            pairs
                .into_iter()
                .map(|(name, value)| Ok((bytes(command, name)?, bytes(command, value)?)))
                .collect::<Result<_, NotificationError>>()?,
        ),
        other => return Err(malformed(command, format!("the fields of entry {id} are {other:?}"))),
    };
    Ok(Entry { id, fields })
}

fn bytes(command: &'static str, value: Value) -> Result<Vec<u8>, NotificationError> {
    redis::from_redis_value(value).map_err(|e| malformed(command, e.to_string()))
}

fn text(command: &'static str, value: Value) -> Result<String, NotificationError> {
    redis::from_redis_value(value).map_err(|e| malformed(command, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &[u8]) -> Value {
        Value::BulkString(text.to_vec())
    }

    fn raw_entry(id: &str, fields: &[(&[u8], &[u8])]) -> Value {
        let flat = fields.iter().flat_map(|(name, value)| [bulk(name), bulk(value)]).collect();
        Value::Array(vec![bulk(id.as_bytes()), Value::Array(flat)])
    }

    fn entry(id: &str, fields: &[(&[u8], &[u8])]) -> Entry {
        Entry { id: id.into(), fields: Some(fields.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect()) }
    }

    #[test]
    fn a_read_reply_yields_entries_in_order_including_deleted_and_non_utf8_ones() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(b"events.order"),
            Value::Array(vec![
                raw_entry("1-0", &[(b"event_id", b"a"), (b"payload", b"{}")]),
                Value::Array(vec![bulk(b"2-0"), Value::Nil]),
                raw_entry("3-0", &[(b"\xff", b"\xfe")]),
            ]),
        ])]);
        assert_eq!(
            read_reply(reply).expect("parses"),
            vec![
                entry("1-0", &[(b"event_id", b"a"), (b"payload", b"{}")]),
                Entry { id: "2-0".into(), fields: None },
                entry("3-0", &[(b"\xff", b"\xfe")]),
            ]
        );
    }

    #[test]
    fn a_read_reply_in_resp3_is_a_map_of_streams() {
        let reply = Value::Map(vec![(bulk(b"s"), Value::Array(vec![raw_entry("1-0", &[(b"k", b"v")])]))]);
        assert_eq!(read_reply(reply).expect("parses"), vec![entry("1-0", &[(b"k", b"v")])]);
    }

    #[test]
    fn a_timed_out_or_empty_read_has_no_entries() {
        assert_eq!(read_reply(Value::Nil).expect("parses"), vec![]);
        let empty = Value::Array(vec![Value::Array(vec![bulk(b"s"), Value::Array(vec![])])]);
        assert_eq!(read_reply(empty).expect("parses"), vec![]);
    }

    #[test]
    fn a_malformed_read_reply_names_the_command() {
        for reply in [
            Value::Int(1),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Array(vec![bulk(b"s"), Value::Int(1)])]),
            Value::Array(vec![Value::Array(vec![
                bulk(b"s"),
                Value::Array(vec![Value::Array(vec![bulk(b"1-0"), Value::Array(vec![bulk(b"odd")])])]),
            ])]),
        ] {
            let err = read_reply(reply).expect_err("malformed");
            assert!(err.to_string().starts_with("unexpected reply from Redis to XREADGROUP"), "{err}");
        }
    }

    #[test]
    fn a_claim_reply_yields_the_cursor_the_claimed_and_the_deleted_entries() {
        let reply = Value::Array(vec![
            bulk(b"7-0"),
            Value::Array(vec![raw_entry("5-0", &[(b"k", b"v")])]),
            Value::Array(vec![bulk(b"6-0")]),
        ]);
        let (cursor, entries) = claim_reply(reply).expect("parses");
        assert_eq!(cursor, "7-0");
        assert_eq!(entries, vec![entry("5-0", &[(b"k", b"v")]), Entry { id: "6-0".into(), fields: None }]);

        let redis_6 = Value::Array(vec![bulk(b"0-0"), Value::Array(vec![])]);
        assert_eq!(claim_reply(redis_6).expect("parses"), ("0-0".into(), vec![]));
        assert!(claim_reply(Value::Nil).is_err());
    }

    #[test]
    fn connection_names_are_what_redis_accepts() {
        assert_eq!(client_name("notification-7d9f-x2"), "notification-7d9f-x2");
        assert_eq!(client_name("my pod\n1é"), "my_pod_1_");
    }

    #[test]
    fn a_dead_letter_keeps_the_original_fields_after_the_reason() {
        let original =
            entry("9-0", &[(b"event_id", b"e"), (b"\xff", b"x"), (DEAD_LETTER_REASON.as_bytes(), b"forged")]);
        let fields = dead_letter_fields(&original, "events.order", "6", "too often");
        let expected: Vec<(&[u8], &[u8])> = vec![
            (b"dead_letter_reason", b"too often"),
            (b"dead_letter_deliveries", b"6"),
            (b"dead_letter_original_id", b"9-0"),
            (b"dead_letter_original_stream", b"events.order"),
            (b"event_id", b"e"),
            (b"\xff", b"x"),
        ];
        assert_eq!(fields, expected);

        let deleted = Entry { id: "8-0".into(), fields: None };
        assert_eq!(dead_letter_fields(&deleted, "s", "1", "gone").len(), 4);
    }
}
