//! The consumer's settings: command-line options (each also read from the environment) and what they resolve to.

use std::time::Duration;

use crate::NotificationError;

/// Command-line options of the event consumer.
#[derive(clap::Args, Debug, Clone)]
pub struct ConsumerArgs {
    /// Serve the API only; do not consume order events.
    #[arg(long, env = "NOTIFICATION_DISABLE_CONSUMER")]
    pub disable_consumer: bool,
    /// The stream of order events (the OutboxRelay writes `events.<aggregate type>`).
    #[arg(long, env = "NOTIFICATION_STREAM", default_value = "events.order")]
    pub stream: String,
    /// The consumer group; replicas in one group share the entries between them.
    #[arg(long, env = "NOTIFICATION_GROUP", default_value = "notification")]
    pub group: String,
    /// This replica's name in the group; it must survive a restart of the process for the replica to pick up
    /// its own pending entries [default: POD_NAME, else HOSTNAME, else a generated name].
    #[arg(long, env = "NOTIFICATION_CONSUMER_NAME")]
    pub consumer_name: Option<String>,
    /// Where entries that cannot be processed go, with the reason; `<stream>.dead-letter` unless set.
    #[arg(long, env = "NOTIFICATION_DEAD_LETTER_STREAM")]
    pub dead_letter_stream: Option<String>,
    /// An entry delivered more often than this goes to the dead-letter stream instead of being processed.
    #[arg(long, env = "NOTIFICATION_MAX_DELIVERIES", default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub max_deliveries: u64,
    /// Entries pending longer than this (e.g. `90s`, `5m`, `1m30s`, or seconds) are taken over from the consumer
    /// that read them, which is presumed dead.
    #[arg(long, env = "NOTIFICATION_CLAIM_MIN_IDLE", default_value = "60s", value_parser = kubesaga_kit::duration::parse)]
    pub claim_min_idle: Duration,
    /// Longest a read waits for new entries before the consumer looks for entries to take over.
    #[arg(long, env = "NOTIFICATION_BLOCK", default_value = "5s", value_parser = kubesaga_kit::duration::parse)]
    pub block: Duration,
}

/// What the consumer runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The stream to consume.
    pub stream: String,
    /// The consumer group.
    pub group: String,
    /// This consumer's name in the group.
    pub consumer: String,
    /// The dead-letter stream.
    pub dead_letter_stream: String,
    /// Deliveries after which an entry is dead-lettered instead of processed.
    pub max_deliveries: u64,
    /// Idle time after which a pending entry is taken over.
    pub claim_min_idle: Duration,
    /// Longest wait of one read.
    pub block: Duration,
}

impl Config {
    /// Refuses settings that would make the consumer misbehave rather than fail.
    pub fn validate(&self) -> Result<(), NotificationError> {
        let invalid = |message: &str| Err(NotificationError::Config(message.to_owned()));
        if self.stream.is_empty() || self.group.is_empty() || self.consumer.is_empty() {
            return invalid("--stream, --group and --consumer-name must not be empty");
        }
        if self.dead_letter_stream == self.stream {
            return invalid("--dead-letter-stream must differ from --stream, or rejected entries come back");
        }
        // `BLOCK 0` waits forever, and a read that never returns never looks for entries to take over.
        if self.block < Duration::from_millis(1) {
            return invalid("--block must be at least 1ms");
        }
        // With no idle time the consumers would take entries from each other while they are being processed.
        if self.claim_min_idle < Duration::from_millis(1) {
            return invalid("--claim-min-idle must be at least 1ms");
        }
        Ok(())
    }
}

impl ConsumerArgs {
    /// The settings, with the defaults that depend on other settings or on the environment filled in; `env` reads
    /// a variable (the process environment, outside tests).
    pub fn into_config(self, env: impl Fn(&str) -> Option<String>) -> Result<Config, NotificationError> {
        let consumer = self
            .consumer_name
            .filter(|name| !name.is_empty())
            .or_else(|| ["POD_NAME", "HOSTNAME"].into_iter().find_map(|var| env(var).filter(|v| !v.is_empty())))
            .unwrap_or_else(|| format!("notification-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
        let config = Config {
            dead_letter_stream: self.dead_letter_stream.unwrap_or_else(|| format!("{}.dead-letter", self.stream)),
            stream: self.stream,
            group: self.group,
            consumer,
            max_deliveries: self.max_deliveries,
            claim_min_idle: self.claim_min_idle,
            block: self.block,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        consumer: ConsumerArgs,
    }

    fn args(extra: &[&str]) -> ConsumerArgs {
        Cli::try_parse_from(std::iter::once("notification").chain(extra.iter().copied())).expect("parses").consumer
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let config = args(&["--consumer-name", "pod-1"]).into_config(no_env).expect("valid");
        let expected = Config {
            stream: "events.order".into(),
            group: "notification".into(),
            consumer: "pod-1".into(),
            dead_letter_stream: "events.order.dead-letter".into(),
            max_deliveries: 5,
            claim_min_idle: Duration::from_secs(60),
            block: Duration::from_secs(5),
        };
        assert_eq!(config, expected);
        assert!(!args(&[]).disable_consumer);
    }

    #[test]
    fn the_dead_letter_stream_follows_the_stream_unless_named() {
        let config = args(&["--stream", "events.x", "--consumer-name", "c"]).into_config(no_env).expect("valid");
        assert_eq!(config.dead_letter_stream, "events.x.dead-letter");
        let config = args(&["--stream", "events.x", "--consumer-name", "c", "--dead-letter-stream", "dlq"])
            .into_config(no_env)
            .expect("valid");
        assert_eq!(config.dead_letter_stream, "dlq");
    }

    #[test]
    fn the_consumer_name_comes_from_the_flag_the_pod_the_host_or_is_generated() {
        let env = |pod: Option<&'static str>, host: Option<&'static str>| {
            move |var: &str| match var {
                "POD_NAME" => pod.map(str::to_owned),
                "HOSTNAME" => host.map(str::to_owned),
                _ => None,
            }
        };
        let name = |flag: &[&str], pod, host| args(flag).into_config(env(pod, host)).expect("valid").consumer;
        assert_eq!(name(&["--consumer-name", "flag"], Some("pod"), Some("host")), "flag");
        assert_eq!(name(&[], Some("pod"), Some("host")), "pod");
        assert_eq!(name(&[], Some(""), Some("host")), "host");
        assert_eq!(name(&[], None, Some("host")), "host");
        let generated = name(&[], None, None);
        assert!(generated.starts_with("notification-") && generated.len() == 21, "{generated}");
        assert_ne!(generated, name(&[], None, None), "two replicas without names must not share one");
    }

    #[test]
    fn settings_that_would_misbehave_are_refused_with_the_flag_to_fix() {
        for (flags, flag) in [
            (&["--block", "0"][..], "--block"),
            (&["--claim-min-idle", "0s"][..], "--claim-min-idle"),
            (&["--dead-letter-stream", "events.order"][..], "--dead-letter-stream"),
            (&["--group", ""][..], "--group"),
        ] {
            let err = args(flags).into_config(|_| Some("pod".into())).expect_err(flag);
            assert!(err.to_string().contains(flag), "{err}");
        }
        assert!(Cli::try_parse_from(["notification", "--max-deliveries", "0"]).is_err());
    }
}
