//! `dpkg-buildpackage -b -us -uc` builds the Debian package, and the package
//! installs what issue 6 asks for: restore-client in /usr/bin, the agent in
//! /usr/lib/restore-agent/ (not in $PATH), completions and the man page.
//!
//! The build runs on a copy of the source tree (dpkg-buildpackage writes its
//! results next to the tree) with cargo's target directory shared with this
//! checkout and DEB_BUILD_OPTIONS=noopt (cargo's dev profile), so only this
//! crate is compiled again. Skipped with a
//! message when dpkg-buildpackage or debhelper is missing, unless
//! RESTORE_AGENT_REQUIRE_DEB=1 (set by .ci/run).

use std::path::Path;
use std::process::Command;

fn have(prog: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_package_installs_client_agent_completions_and_man_page() {
    let require = std::env::var_os("RESTORE_AGENT_REQUIRE_DEB").is_some_and(|v| v == "1");
    if !have("dpkg-buildpackage") || !have("dh") {
        assert!(
            !require,
            "dpkg-buildpackage or debhelper missing and RESTORE_AGENT_REQUIRE_DEB=1"
        );
        eprintln!("SKIPPED: dpkg-buildpackage or debhelper (dh) not installed");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("restore-agent");
    std::fs::create_dir(&src).unwrap();
    for entry in std::fs::read_dir(root).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "target" || name == ".git" {
            continue;
        }
        let ok = Command::new("cp")
            .arg("-a")
            .arg(entry.path())
            .arg(&src)
            .status()
            .unwrap()
            .success();
        assert!(ok, "copy {}", entry.path().display());
    }
    let build = Command::new("dpkg-buildpackage")
        .args(["-b", "-us", "-uc"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", root.join("target"))
        // Debug binaries: the package layout is under test, not the optimiser.
        .env("DEB_BUILD_OPTIONS", "noopt")
        .output()
        .expect("run dpkg-buildpackage");
    assert!(
        build.status.success(),
        "dpkg-buildpackage failed:\n{}\n{}",
        String::from_utf8_lossy(&build.stdout),
        String::from_utf8_lossy(&build.stderr)
    );
    let deb = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("a .deb next to the source tree");
    let list = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    assert!(list.status.success());
    let list = String::from_utf8_lossy(&list.stdout);
    // `dpkg-deb -c` prints `ls -l`-like lines ending in ./path.
    let files: Vec<(&str, &str)> = list
        .lines()
        .filter_map(|l| {
            let path = l.split_whitespace().last()?;
            Some((l.split_whitespace().next()?, path.trim_start_matches('.')))
        })
        .collect();
    let mode_of = |path: &str| files.iter().find(|(_, p)| *p == path).map(|(m, _)| *m);
    for (path, mode) in [
        ("/usr/bin/restore-client", "-rwxr-xr-x"),
        ("/usr/lib/restore-agent/restore-agent", "-rwxr-xr-x"),
        (
            "/usr/share/bash-completion/completions/restore-client",
            "-rw-r--r--",
        ),
        (
            "/usr/share/zsh/vendor-completions/_restore-client",
            "-rw-r--r--",
        ),
        (
            "/usr/share/fish/vendor_completions.d/restore-client.fish",
            "-rw-r--r--",
        ),
    ] {
        assert_eq!(mode_of(path), Some(mode), "{path} in:\n{list}");
    }
    // the main page, and one per subcommand that it names
    for page in [
        "restore-client",
        "restore-client-extract",
        "restore-client-vm-start",
    ] {
        assert!(
            files
                .iter()
                .any(|(_, p)| p.starts_with(&format!("/usr/share/man/man1/{page}.1"))),
            "man page {page} missing:\n{list}"
        );
    }
    // The agent is not on $PATH.
    assert!(
        !files.iter().any(|(_, p)| p.ends_with("bin/restore-agent")),
        "agent in a bin directory:\n{list}"
    );
    let info = Command::new("dpkg-deb")
        .arg("-f")
        .arg(&deb)
        .arg("Package")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&info.stdout).trim(),
        "restore-agent"
    );
}
