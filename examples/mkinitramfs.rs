//! Writes the file-restore VM's base initramfs (used by
//! scripts/build-vm-image.sh): `mkinitramfs OUT AGENT [MODULE.ko]...`.

use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [out, agent, modules @ ..] = args.as_slice() else {
        eprintln!("usage: mkinitramfs OUT AGENT [MODULE.ko]...");
        std::process::exit(2);
    };
    let modules: Vec<&Path> = modules.iter().map(Path::new).collect();
    if let Err(e) =
        restore_agent::vm::image::build_base_initramfs(Path::new(agent), &modules, Path::new(out))
    {
        eprintln!("mkinitramfs: {e}");
        std::process::exit(1);
    }
}
