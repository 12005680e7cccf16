//! `mapper`: the stock mapper, with the built-in transforms (digest, jq) and the programs its
//! operator registers with `--command`.

fn main() -> std::process::ExitCode {
    mapper::main_with(transform::Registry::builtin())
}
