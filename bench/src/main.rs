//! `codec-bench`: sarde's codecs against the command-line tools on a disk-like file.
//!
//! Every measurement is a separate process (this binary re-invoked with a hidden
//! subcommand, or the tool itself) streaming file → codec → file, so wall time and
//! peak RSS (from `wait4`) are the same kind of number for both sides and one run's
//! allocations cannot leak into the next. Decoders and tools decode the same bytes
//! (sarde's own multi-threaded output) and every decoded file is checked against
//! the original's sha256.
//!
//! ```text
//! cargo run --release -p sarde-bench --bin codec-bench -- [--size 512MiB] [--dir DIR]
//!     [--codecs zstd,gzip,xz,raw] [--xz-level N] [--repeat N] [--format json]
//! ```

mod data;
mod measure;
mod sink;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use sarde_api::codec::Output;
use sarde_api::{EncodeOptions, Origin, Registry};

use measure::Measurement;

/// Copy buffer for the measured streams: big reads keep per-call overhead out of
/// the numbers.
const COPY_BUFFER: usize = 1 << 20;

#[derive(Parser)]
#[command(
    name = "codec-bench",
    about = "Measure sarde's codecs against zstd, gzip, pigz and xz on a disk-like file"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Hidden>,
    /// Size of the generated input (KiB, MiB, GiB, KB, MB, GB).
    #[arg(long, default_value = "512MiB")]
    size: String,
    /// Where the input is cached and outputs go [default: <workspace>/target/bench-data].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Codecs to measure.
    #[arg(long, value_delimiter = ',', default_value = "zstd,gzip,xz,raw")]
    codecs: Vec<String>,
    #[arg(long, default_value_t = sarde_codec_zstd::DEFAULT_LEVEL)]
    zstd_level: i32,
    #[arg(long, default_value_t = sarde_codec_gzip::DEFAULT_LEVEL)]
    gzip_level: i32,
    #[arg(long, default_value_t = sarde_codec_xz::DEFAULT_LEVEL)]
    xz_level: i32,
    /// The "many threads" setting [default: the CPUs this process may use].
    #[arg(long)]
    threads: Option<usize>,
    /// Runs per measurement; the fastest counts. Runs over 10 s are not repeated.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Direction {
    Encode,
    Decode,
}

impl Direction {
    fn short(self) -> &'static str {
        match self {
            Direction::Encode => "enc",
            Direction::Decode => "dec",
        }
    }
}

#[derive(Subcommand)]
enum Hidden {
    /// One measured stream (run by the benchmark itself).
    #[command(name = "__measure", hide = true)]
    Measure {
        #[arg(long)]
        codec: String,
        #[arg(long, value_enum)]
        direction: Direction,
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        level: Option<i32>,
        /// Restrict the process to one CPU (decoders size their pools from it).
        #[arg(long)]
        one_cpu: bool,
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
    },
}

fn registry() -> Result<Registry> {
    let mut registry = Registry::new();
    let mut r = registry.registrar(Origin::BuiltIn);
    sarde_codec_zstd::register(&mut r)?;
    sarde_codec_gzip::register(&mut r)?;
    sarde_codec_xz::register(&mut r)?;
    sarde_codec_raw::register(&mut r)?;
    Ok(registry)
}

/// Copies `input` to `output` in large pieces.
fn pump(input: &mut dyn Read, output: &mut dyn Write) -> Result<u64> {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        output.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// The hidden subcommand: one stream, file to file.
fn measured_child(
    codec: &str,
    direction: Direction,
    threads: usize,
    level: Option<i32>,
    one_cpu: bool,
    input: &Path,
    output: &Path,
) -> Result<()> {
    if one_cpu {
        measure::pin_to_one_cpu()?;
    }
    let codec = registry()?.codec(codec)?;
    let mut input = File::open(input).with_context(|| format!("opening {}", input.display()))?;
    let output = File::create(output).with_context(|| format!("creating {}", output.display()))?;
    let (mut sink, writer) = sink::write_behind(output, COPY_BUFFER)?;
    match direction {
        Direction::Encode => {
            let options = EncodeOptions {
                level,
                threads,
                ..Default::default()
            };
            let boxed: Output<'_> = Box::new(sink);
            let mut encoder = codec.encoder(boxed, &options)?;
            pump(&mut input, &mut encoder)?;
            // Flushes the sink and drops it, which ends the writer thread.
            encoder.finish()?;
        }
        Direction::Decode => {
            let mut decoder = codec.decoder(Box::new(input))?;
            pump(&mut decoder, &mut sink)?;
            sink.flush()?;
            drop(sink);
        }
    }
    writer.join()?;
    Ok(())
}

/// A command-line tool run.
#[derive(Clone)]
struct Tool {
    label: String,
    direction: Direction,
    program: &'static str,
    args: Vec<String>,
    /// Pinned to one CPU, to pair with sarde's one-CPU decode.
    one_cpu: bool,
}

/// Suffix of the one-CPU variant of a tool's label.
const ONE_CPU: &str = " @1cpu";

impl Tool {
    fn new(label: &str, direction: Direction, program: &'static str, args: &[&str]) -> Self {
        Tool {
            label: label.to_string(),
            direction,
            program,
            args: args.iter().map(|s| s.to_string()).collect(),
            one_cpu: false,
        }
    }

    fn on_one_cpu(&self) -> Self {
        Tool {
            label: format!("{}{ONE_CPU}", self.label),
            one_cpu: true,
            ..self.clone()
        }
    }
}

/// What a codec is compared with, and which rows pair up.
struct Plan {
    extension: &'static str,
    level: Option<i32>,
    tools: Vec<Tool>,
    /// (direction, many threads?, tool label)
    pairs: Vec<(Direction, bool, String)>,
}

fn plan(codec: &str, cli: &Cli, threads: usize) -> Result<Plan> {
    use Direction::{Decode as D, Encode as E};
    let n = threads.to_string();
    Ok(match codec {
        "zstd" => {
            let l = format!("-{}", cli.zstd_level);
            let t1 = format!("zstd {l} -T1");
            let t0 = format!("zstd {l} -T0");
            Plan {
                extension: "zst",
                level: Some(cli.zstd_level),
                tools: vec![
                    Tool::new(&t1, E, "zstd", &[&l, "-T1", "-c"]),
                    Tool::new(&t0, E, "zstd", &[&l, "-T0", "-c"]),
                    Tool::new("zstd -d", D, "zstd", &["-d", "-c"]),
                ],
                pairs: vec![
                    (E, false, t1),
                    (E, true, t0),
                    (D, false, "zstd -d".into()),
                    (D, true, "zstd -d".into()),
                ],
            }
        }
        "gzip" => {
            let l = format!("-{}", cli.gzip_level);
            let gz = format!("gzip {l}");
            let pigz = format!("pigz {l} -p {n}");
            Plan {
                extension: "gz",
                level: Some(cli.gzip_level),
                tools: vec![
                    Tool::new(&gz, E, "gzip", &[&l, "-c"]),
                    Tool::new(&pigz, E, "pigz", &[&l, "-p", &n, "-c"]),
                    Tool::new("gzip -d", D, "gzip", &["-d", "-c"]),
                    Tool::new("pigz -d", D, "pigz", &["-d", "-c"]),
                ],
                pairs: vec![
                    (E, false, gz.clone()),
                    (E, true, pigz),
                    (E, true, gz),
                    (D, false, "gzip -d".into()),
                    (D, true, "gzip -d".into()),
                    (D, true, "pigz -d".into()),
                ],
            }
        }
        "xz" => {
            let l = format!("-{}", cli.xz_level);
            let t1 = format!("xz {l} -T1");
            let t0 = format!("xz {l} -T0");
            Plan {
                extension: "xz",
                level: Some(cli.xz_level),
                tools: vec![
                    Tool::new(&t1, E, "xz", &[&l, "-T1", "-c"]),
                    Tool::new(&t0, E, "xz", &[&l, "-T0", "-c"]),
                    Tool::new("xz -d -T1", D, "xz", &["-d", "-T1", "-c"]),
                    Tool::new("xz -d -T0", D, "xz", &["-d", "-T0", "-c"]),
                ],
                pairs: vec![
                    (E, false, t1),
                    (E, true, t0),
                    (D, false, "xz -d -T1".into()),
                    (D, true, "xz -d -T0".into()),
                ],
            }
        }
        "raw" => Plan {
            extension: "raw",
            level: None,
            tools: vec![
                Tool::new("cat", E, "cat", &[]),
                Tool::new("cat", D, "cat", &[]),
            ],
            pairs: vec![
                (E, false, "cat".into()),
                (E, true, "cat".into()),
                (D, false, "cat".into()),
                (D, true, "cat".into()),
            ],
        },
        other => bail!("unknown codec {other:?} (zstd, gzip, xz, raw)"),
    })
}

/// One measured run, sarde's or a tool's.
#[derive(Debug, Clone)]
struct Run {
    m: Measurement,
    /// Compressed size, for encodes.
    compressed: Option<u64>,
    /// Whether the decoded output matched the original, for decodes.
    verified: Option<bool>,
}

struct Bench<'a> {
    cli: &'a Cli,
    dir: PathBuf,
    input: PathBuf,
    sha: String,
    threads: usize,
    exe: PathBuf,
}

fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Before each run: no old output, and the input in the page cache (this VM's
/// memory manager may have dropped pages since they were written).
fn prepare(input: &Path, output: &Path) -> Result<()> {
    remove(output)?;
    let mut file = File::open(input).with_context(|| format!("opening {}", input.display()))?;
    pump(&mut file, &mut std::io::sink())?;
    Ok(())
}

impl Bench<'_> {
    fn sarde(&self, codec: &str, plan: &Plan, direction: Direction, threads: usize) -> Result<Run> {
        let encoded = |t: usize| self.dir.join(format!("sarde-t{t}.{}", plan.extension));
        let (input, output) = match direction {
            Direction::Encode => (self.input.clone(), encoded(threads)),
            // Decoders all read the many-thread output (multi-block for xz).
            Direction::Decode => (
                encoded(self.threads),
                self.dir.join(format!("sarde-{codec}-t{threads}.decoded")),
            ),
        };
        eprintln!("sarde {codec} {} threads={threads} ...", direction.short());
        let m = measure::best_of(
            self.cli.repeat,
            || prepare(&input, &output),
            || {
                let mut c = Command::new(&self.exe);
                c.arg("__measure")
                    .args(["--codec", codec])
                    .args(["--direction", direction.short_arg()])
                    .args(["--threads", &threads.to_string()])
                    .arg("--input")
                    .arg(&input)
                    .arg("--output")
                    .arg(&output);
                if let Some(level) = plan.level {
                    c.args(["--level", &level.to_string()]);
                }
                if direction == Direction::Decode && threads == 1 {
                    c.arg("--one-cpu");
                }
                Ok(c)
            },
        )?;
        self.finish_run(m, direction, &output)
    }

    fn tool(&self, codec: &str, plan: &Plan, tool: &Tool) -> Result<Run> {
        let slug: String = tool
            .label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let (input, output) = match tool.direction {
            Direction::Encode => (
                self.input.clone(),
                self.dir.join(format!("tool-{slug}.{}", plan.extension)),
            ),
            Direction::Decode => (
                self.dir
                    .join(format!("sarde-t{}.{}", self.threads, plan.extension)),
                self.dir.join(format!("tool-{codec}-{slug}.decoded")),
            ),
        };
        eprintln!("{} ...", tool.label);
        let m = measure::best_of(
            self.cli.repeat,
            || prepare(&input, &output),
            || {
                let stdin = File::open(&input)?;
                let stdout = File::create(&output)?;
                let mut c = Command::new(tool.program);
                c.args(&tool.args)
                    .stdin(Stdio::from(stdin))
                    .stdout(Stdio::from(stdout));
                if tool.one_cpu {
                    measure::pin_command(&mut c)?;
                }
                Ok(c)
            },
        )?;
        self.finish_run(m, tool.direction, &output)
    }

    fn finish_run(&self, m: Measurement, direction: Direction, output: &Path) -> Result<Run> {
        match direction {
            Direction::Encode => Ok(Run {
                m,
                compressed: Some(fs::metadata(output)?.len()),
                verified: None,
            }),
            Direction::Decode => {
                let ok = data::sha256_file(output)? == self.sha;
                remove(output)?;
                Ok(Run {
                    m,
                    compressed: None,
                    verified: Some(ok),
                })
            }
        }
    }
}

impl Direction {
    fn short_arg(self) -> &'static str {
        match self {
            Direction::Encode => "encode",
            Direction::Decode => "decode",
        }
    }
}

fn tool_exists(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// One line of the table.
struct Row {
    codec: String,
    direction: Direction,
    threads: usize,
    sarde: Run,
    baseline: Option<(String, Run)>,
}

fn mb_per_s(bytes: u64, run: &Run) -> f64 {
    bytes as f64 / run.m.wall.as_secs_f64() / 1e6
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Hidden::Measure {
        codec,
        direction,
        threads,
        level,
        one_cpu,
        input,
        output,
    }) = &cli.command
    {
        return measured_child(codec, *direction, *threads, *level, *one_cpu, input, output);
    }

    let size = data::parse_size(&cli.size)?;
    let dir = cli.dir.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(Path::new("."))
            .join("target/bench-data")
    });
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let (input, sha) = data::ensure(&dir, size)?;
    // Read once so every run starts from the page cache.
    data::sha256_file(&input)?;
    let bench = Bench {
        cli: &cli,
        dir: dir.clone(),
        input,
        sha,
        threads,
        exe: std::env::current_exe()?,
    };

    let thread_counts: Vec<usize> = if threads > 1 {
        vec![1, threads]
    } else {
        vec![1]
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for codec in &cli.codecs {
        let mut plan = plan(codec, &cli, threads)?;
        if threads > 1 {
            // sarde's one-thread decode runs on one CPU; so does its baseline.
            let pinned: Vec<Tool> = plan
                .tools
                .iter()
                .filter(|t| t.direction == Direction::Decode)
                .map(Tool::on_one_cpu)
                .collect();
            plan.tools.extend(pinned);
        }
        let mut sarde = BTreeMap::new();
        let mut tools = BTreeMap::new();
        for direction in [Direction::Encode, Direction::Decode] {
            for &t in &thread_counts {
                sarde.insert((direction, t), bench.sarde(codec, &plan, direction, t)?);
            }
            for tool in plan.tools.iter().filter(|t| t.direction == direction) {
                if !tool_exists(tool.program) {
                    notes.push(format!("{} is not installed: skipped", tool.program));
                    continue;
                }
                match bench.tool(codec, &plan, tool) {
                    Ok(run) => {
                        tools.insert((direction, tool.label.clone()), run);
                    }
                    Err(e) => notes.push(format!("{}: {e:#}", tool.label)),
                }
            }
        }
        for (direction, many, label) in &plan.pairs {
            let t = if *many { threads } else { 1 };
            if *many && threads == 1 {
                continue;
            }
            let Some(run) = sarde.get(&(*direction, t)) else {
                continue;
            };
            let label = if *direction == Direction::Decode && !*many && threads > 1 {
                format!("{label}{ONE_CPU}")
            } else {
                label.clone()
            };
            rows.push(Row {
                codec: codec.clone(),
                direction: *direction,
                threads: t,
                sarde: run.clone(),
                baseline: tools
                    .get(&(*direction, label.clone()))
                    .map(|r| (label, r.clone())),
            });
        }
    }

    let targets = targets(&rows, threads);
    match cli.format {
        Format::Text => print_text(&rows, &targets, &notes, size, threads),
        Format::Json => print_json(&rows, &targets, &notes, size, threads)?,
    }
    Ok(())
}

/// A target line of the spec.
struct Target {
    text: String,
    value: Option<f64>,
    goal: f64,
}

/// sarde's speed over the baseline's (the same bytes, so the inverse wall-time ratio).
fn ratio(row: &Row) -> Option<f64> {
    let (_, base) = row.baseline.as_ref()?;
    Some(base.m.wall.as_secs_f64() / row.sarde.m.wall.as_secs_f64())
}

fn targets(rows: &[Row], threads: usize) -> Vec<Target> {
    let find = |codec: &str, direction: Direction, t: usize, tool: &str| {
        rows.iter().find(|r| {
            r.codec == codec
                && r.direction == direction
                && r.threads == t
                && r.baseline
                    .as_ref()
                    .is_some_and(|(l, _)| l.starts_with(tool))
        })
    };
    let mut out = Vec::new();
    let mut add = |text: String, row: Option<&Row>, goal: f64| {
        if let Some(row) = row {
            out.push(Target {
                value: ratio(row),
                text,
                goal,
            });
        }
    };
    use Direction::{Decode, Encode};
    add(
        "zstd encode, 1 thread, within 15% of `zstd -T1`".into(),
        find("zstd", Encode, 1, "zstd"),
        0.85,
    );
    if threads > 1 {
        add(
            format!("zstd encode, {threads} threads, within 15% of `zstd -T0`"),
            find("zstd", Encode, threads, "zstd"),
            0.85,
        );
    }
    add(
        "zstd decode, 1 CPU, within 15% of `zstd -d`".into(),
        find("zstd", Decode, 1, "zstd"),
        0.85,
    );
    if threads > 1 {
        add(
            format!("zstd decode, {threads} CPUs, within 15% of `zstd -d`"),
            find("zstd", Decode, threads, "zstd"),
            0.85,
        );
        add(
            format!("gzip encode, {threads} threads, >= 1.5x `gzip -6`"),
            find("gzip", Encode, threads, "gzip"),
            1.5,
        );
    }
    out
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn print_text(rows: &[Row], targets: &[Target], notes: &[String], size: u64, threads: usize) {
    println!(
        "input: {} MiB disk-like data; MB/s = 10^6 bytes of uncompressed data per second; \
         many threads = {threads}",
        size >> 20
    );
    println!(
        "decode rows: every decoder reads sarde's {threads}-thread output; thr 1 = sarde and \
         the tool ({ONE_CPU}) pinned to one CPU"
    );
    println!();
    println!(
        "{:<5} {:<4} {:>3} {:>11} {:<19} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6}",
        "codec",
        "dir",
        "thr",
        "sarde MB/s",
        "baseline",
        "base MB/s",
        "sarde/base",
        "size sarde",
        "size base",
        "RSS sarde",
        "RSS base",
        "sha"
    );
    for row in rows {
        let sarde_speed = mb_per_s(size, &row.sarde);
        let pct = |run: &Run| {
            run.compressed
                .map(|c| format!("{:.2}%", 100.0 * c as f64 / size as f64))
                .unwrap_or_else(|| "-".into())
        };
        let (label, base_speed, rel, base_size, base_rss) = match &row.baseline {
            Some((label, base)) => (
                label.clone(),
                format!("{:.1}", mb_per_s(size, base)),
                format!("{:.2}", sarde_speed / mb_per_s(size, base)),
                pct(base),
                mib(base.m.max_rss_kib),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        let sha = match (
            row.sarde.verified,
            row.baseline.as_ref().and_then(|b| b.1.verified),
        ) {
            (None, _) => "",
            (Some(true), None | Some(true)) => "ok",
            _ => "BAD",
        };
        println!(
            "{:<5} {:<4} {:>3} {:>11.1} {:<19} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6}",
            row.codec,
            row.direction.short(),
            row.threads,
            sarde_speed,
            label,
            base_speed,
            rel,
            pct(&row.sarde),
            base_size,
            mib(row.sarde.m.max_rss_kib),
            base_rss,
            sha
        );
    }
    println!();
    for t in targets {
        match t.value {
            Some(v) => println!(
                "target: {:<52} {:.2} (goal >= {:.2})  {}",
                t.text,
                v,
                t.goal,
                if v >= t.goal { "PASS" } else { "MISS" }
            ),
            None => println!("target: {:<52} no baseline  MISS", t.text),
        }
    }
    for note in notes {
        println!("note: {note}");
    }
}

fn print_json(
    rows: &[Row],
    targets: &[Target],
    notes: &[String],
    size: u64,
    threads: usize,
) -> Result<()> {
    let run = |r: &Run| {
        serde_json::json!({
            "seconds": r.m.wall.as_secs_f64(),
            "mb_per_s": mb_per_s(size, r),
            "max_rss_kib": r.m.max_rss_kib,
            "compressed_bytes": r.compressed,
            "verified": r.verified,
        })
    };
    let rows: Vec<_> = rows
        .iter()
        .map(|row| {
            serde_json::json!({
                "codec": row.codec,
                "direction": row.direction.short_arg(),
                "threads": row.threads,
                "sarde": run(&row.sarde),
                "baseline": row.baseline.as_ref().map(|(label, r)| serde_json::json!({
                    "tool": label,
                    "run": run(r),
                })),
                "ratio": ratio(row),
            })
        })
        .collect();
    let targets: Vec<_> = targets
        .iter()
        .map(|t| {
            serde_json::json!({
                "target": t.text,
                "value": t.value,
                "goal": t.goal,
                "pass": t.value.is_some_and(|v| v >= t.goal),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "input_bytes": size,
        "threads": threads,
        "rows": rows,
        "targets": targets,
        "notes": notes,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
