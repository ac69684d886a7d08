//! The operator as a real process, so tests can kill it with SIGKILL at any moment and start it again.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use crate::required_env;

/// A `kubesaga-operator run` process confined to one namespace (its sagas and its leader Lease), so that tests
/// running in parallel each drive only their own sagas.
pub struct OperatorProcess {
    binary: PathBuf,
    namespace: String,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl OperatorProcess {
    /// Starts `binary` (a test gets it from `env!("CARGO_BIN_EXE_kubesaga-operator")`) for `namespace`.
    pub fn start(binary: impl AsRef<Path>, namespace: &str, extra_args: &[&str]) -> Self {
        Self::start_with_env(binary, namespace, extra_args, &[])
    }

    /// Like [`OperatorProcess::start`], with extra environment variables for this start only (e.g. fault
    /// injection); [`OperatorProcess::restart`] starts without them.
    pub fn start_with_env(
        binary: impl AsRef<Path>,
        namespace: &str,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let log = std::env::temp_dir().join(format!("kubesaga-operator-{namespace}-{}.log", crate::unique_suffix()));
        let mut process = Self {
            binary: binary.as_ref().to_owned(),
            namespace: namespace.to_owned(),
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
            env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            log,
            child: None,
            starts: 0,
        };
        process.spawn();
        process
    }

    fn spawn(&mut self) {
        let log = File::options().create(true).append(true).open(&self.log).expect("open operator log");
        let child = Command::new(&self.binary)
            .args(["run", "--namespace", &self.namespace, "--lease-namespace", &self.namespace])
            .args(["--lease-seconds", "3"])
            .args(if self.extra_args.iter().any(|a| a == "--listen") {
                &[][..]
            } else {
                &["--listen", "127.0.0.1:0"][..]
            })
            .args(&self.extra_args)
            .env("KUBECONFIG", required_env("KUBECONFIG"))
            .env(
                "RUST_LOG",
                // Not `kube=warn`: filter targets match by prefix, and that one would silence `kubesaga_operator` too.
                std::env::var("RUST_LOG")
                    .ok()
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| "info,kube_client=warn,kube_runtime=warn".into()),
            )
            .envs(std::mem::take(&mut self.env))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("start kubesaga-operator");
        self.child = Some(child);
        self.starts += 1;
    }

    /// Kills the process with SIGKILL, as a crash would, and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process has exited (it crashed, or fault injection aborted it); reaps it if so.
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(_))) | None => true,
            Some(Ok(None)) => false,
            Some(Err(err)) => panic!("cannot check the operator process: {err}"),
        }
    }

    /// Waits until the process exits by itself (fault injection aborts it), failing the test after `timeout`.
    pub async fn wait_exit(&mut self, timeout: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.exited() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the operator did not exit within {timeout:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.child = None;
    }

    /// Starts the process again after [`OperatorProcess::kill`].
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// How many times the process was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Everything the process (and its earlier incarnations) logged, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the log is.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("operator log kept at {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
