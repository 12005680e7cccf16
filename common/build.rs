//! Records the git commit for the `chunkmill_build_info` metric (`unknown` outside a checkout,
//! e.g. in a container build; set CHUNKMILL_GIT_COMMIT to override).

fn main() {
    println!("cargo:rerun-if-env-changed=CHUNKMILL_GIT_COMMIT");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/refs/heads");
    let commit = std::env::var("CHUNKMILL_GIT_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    });
    println!("cargo:rustc-env=CHUNKMILL_GIT_COMMIT={}", commit.unwrap_or_else(|| "unknown".into()));
}
