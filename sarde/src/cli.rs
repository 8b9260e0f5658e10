//! Command-line syntax of `sarde`.

use std::path::PathBuf;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use sarde_cli::config::FlagValues;

const ABOUT: &str = "Move libvirt VMs through OCI registries, the way docker moves containers";

const LONG_ABOUT: &str = "\
sarde moves libvirt VMs (domain XML, qcow2 disks with their backing chains, login \
details) as OCI images through any OCI registry, so every CI runner can run the \
same VM image, named per job like a container image.

Configuration: defaults < /etc/sardinecake/sarde.ini < ~/.config/sardinecake/sarde.ini \
(or the files in SARDE_CONF_FILES) < SARDE_* environment variables < flags. \
`sarde config` shows the result and where each value came from.";

#[derive(Debug, Parser)]
#[command(name = "sarde", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    /// More output on stderr (repeat for more)
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Less output on stderr (repeat for less)
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub quiet: u8,

    /// Load a plugin library (repeatable), besides those in the plugin directories
    #[arg(long, value_name = "PATH", global = true)]
    pub plugin: Vec<PathBuf>,

    /// Plugin directories, colon-separated (instead of the configured ones)
    #[arg(long, value_name = "DIRS", global = true)]
    pub plugin_dir: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Export a libvirt VM (domain, disks with their backing chains) as an image in the local cache
    Export(Box<ExportArgs>),
    /// Create a libvirt VM from an image in the local cache
    Import(Box<ImportArgs>),
    /// Push an image of the local cache to a registry (several tags with several --target)
    Push(Box<PushArgs>),
    /// Fetch an image from a registry into the local cache
    Fetch(Box<FetchArgs>),
    /// Copy an image between any two transports (registry, OCI layout directory, …)
    Copy(Box<CopyArgs>),
    /// Fetch an image and import it as a VM (pieces go to disk as they arrive)
    Pull(Box<PullArgs>),
    /// Make a copy-on-write clone of a VM (or of an image, pulled when missing)
    Clone(Box<CloneArgs>),
    /// Store credentials for a registry, after checking them with it
    Login(Box<LoginArgs>),
    /// Remove stored credentials for a registry ('*': for all)
    Logout(Box<LogoutArgs>),
    /// List the images in the local cache and the VMs imported from them
    List(Box<ListArgs>),
    /// Print the access JSON (users, services) stored with an image
    Getconfig(Box<GetconfigArgs>),
    /// Show one image: its files with virtual and stored sizes, pieces, codec, metadata, and the VMs and clones that use it
    Inspect(Box<InspectArgs>),
    /// Remove images from the local cache (and blobs no other tag uses), or with --vm, VMs sarde imported
    Rm(Box<RmArgs>),
    /// Free space: garbage always; images (and with --vms, VMs) unused for a while or beyond a space budget
    Prune(Box<PruneArgs>),
    /// List every registered codec, transport and hypervisor and where it comes from
    Plugins(PluginsArgs),
    /// Print the effective configuration and where each value came from
    Config(Box<ConfigArgs>),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions(CompletionsArgs),
    /// Signing keys: `sarde key generate` writes a key pair cosign and skopeo read
    Key(KeyArgs),
}

impl Command {
    /// The section of the configuration files that applies.
    pub fn config_section(&self) -> Option<&str> {
        match self {
            Command::Export(_) => Some("export"),
            Command::Import(_) => Some("import"),
            Command::Push(_) => Some("push"),
            Command::Fetch(_) => Some("fetch"),
            Command::Copy(_) => Some("copy"),
            Command::Pull(_) => Some("pull"),
            Command::Clone(_) => Some("clone"),
            Command::Login(_) => Some("login"),
            Command::Logout(_) => Some("logout"),
            Command::List(_) => Some("list"),
            Command::Getconfig(_) => Some("getconfig"),
            Command::Inspect(_) => Some("inspect"),
            Command::Rm(_) => Some("rm"),
            Command::Prune(_) => Some("prune"),
            Command::Plugins(_) => Some("plugins"),
            Command::Config(args) => args.for_command.as_deref(),
            Command::Completions(_) | Command::Key(_) => None,
        }
    }
}

/// Output for people or for programs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    #[default]
    Text,
    Json,
}

/// The image format export writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum ImageFormat {
    /// sarde's chunked format: pieces compressed alone, parallel and incremental
    #[default]
    Native,
    /// The Python tool's format (gzip streams)
    V1,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// JSON file with how to log in ({"users":[{"username":…,"password":…}]})
    #[arg(long, value_name = "FILE")]
    pub vmconfig: Option<PathBuf>,
    /// Read the domain XML from FILE instead of libvirt
    #[arg(long, value_name = "FILE")]
    pub libvirtconfig: Option<PathBuf>,
    /// Image format to write (v1: the Python tool's, gzip)
    #[arg(long, value_enum, default_value_t)]
    pub image_format: ImageFormat,
    /// Export even though the VM is running (its disks may be inconsistent)
    #[arg(long)]
    pub force: bool,
    /// json: print what the export did (image id, bytes read and stored, pieces reused) as one object
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
    /// IMAGE is a directory (an OCI layout) with an optional :TAG, not a name in the cache
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub libvirt: LibvirtFlags,
    #[command(flatten)]
    pub cache: CacheFlags,
    #[command(flatten)]
    pub compression: CompressionFlags,
    #[command(flatten)]
    pub threads: ThreadsFlags,
    /// The libvirt domain to export
    pub vm: String,
    /// Image name[:tag] (default: the VM's name, tag latest)
    pub image: Option<String>,
    /// The image name, as the Python tool spelled it (instead of IMAGE)
    #[arg(
        short = 't',
        long = "tag",
        value_name = "REF",
        conflicts_with = "image"
    )]
    pub tag: Option<String>,
}

/// How import (and pull) create the VM.
#[derive(Debug, Args)]
pub struct ImportFlags {
    /// Name of the new VM (default: the image id, so one image maps to one VM)
    #[arg(short, long)]
    pub name: Option<String>,
    /// Print the new VM's UUID instead of its name
    #[arg(long)]
    pub print_uuid: bool,
    /// Replace an existing VM of that name that was not imported from this image
    #[arg(long)]
    pub replace: bool,
    /// Accept domain XML that reaches outside the VM (host devices, host paths, qemu:commandline)
    #[arg(long)]
    pub allow_unsafe_xml: bool,
}

impl ImportFlags {
    /// The import request for `image` with these flags.
    pub fn request(
        &self,
        image: sarde_engine::ImageLocation,
    ) -> sarde_engine::import::ImportRequest {
        sarde_engine::import::ImportRequest {
            image,
            name: self.name.clone(),
            replace: self.replace,
            allow_unsafe_xml: self.allow_unsafe_xml,
            incoming: None,
            imported_by: None,
        }
    }
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub vm: ImportFlags,
    /// IMAGE is a directory (an OCI layout) with an optional :TAG, not a name in the cache
    #[arg(long)]
    pub raw: bool,
    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
    #[command(flatten)]
    pub libvirt: LibvirtFlags,
    #[command(flatten)]
    pub cache: CacheFlags,
    #[command(flatten)]
    pub vmdir: VmDirFlags,
    #[command(flatten)]
    pub threads: ThreadsFlags,
    /// Image name[:tag|@digest]
    pub image: String,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Push to REF rather than to IMAGE's own name (repeat for several tags)
    #[arg(short = 't', long = "target", value_name = "REF")]
    pub targets: Vec<String>,
    /// Allow plain HTTP and unverified TLS for the registries of this command
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub sign: SignFlags,
    /// Output format (json: one summary line)
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
    #[command(flatten)]
    pub cache: CacheFlags,
    #[command(flatten)]
    pub transfer: TransferFlags,
    /// Image of the local cache, name[:tag|@digest]
    pub image: String,
}

/// Signing what a command writes to a registry, with skopeo's flag names.
#[derive(Debug, Args)]
pub struct SignFlags {
    /// Sign the image at its destination with this private key (cosign's format; `sarde key generate` writes one)
    #[arg(long, value_name = "KEY")]
    pub sign_by_sigstore_private_key: Option<PathBuf>,
    /// Read the signing key's passphrase from FILE (asked for on a terminal when missing)
    #[arg(long, value_name = "FILE", requires = "sign_by_sigstore_private_key")]
    pub sign_passphrase_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    pub command: KeyCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write a new signing key pair: PREFIX.private (encrypted, as cosign and skopeo read it) and PREFIX.pub
    Generate(KeyGenerateArgs),
}

#[derive(Debug, Args)]
pub struct KeyGenerateArgs {
    /// Write PREFIX.private and PREFIX.pub (as `skopeo generate-sigstore-key`)
    #[arg(long, value_name = "PREFIX")]
    pub output_prefix: PathBuf,
    /// Read the passphrase that encrypts the private key from FILE (asked for on a terminal when missing)
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Allow plain HTTP and unverified TLS for the registries of this command
    #[arg(long)]
    pub insecure: bool,
    #[command(flatten)]
    pub sign: SignFlags,
    /// Output format (json: one summary line)
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
    #[command(flatten)]
    pub cache: CacheFlags,
    #[command(flatten)]
    pub transfer: TransferFlags,
    #[command(flatten)]
    pub policy: PolicyFlags,
    /// Where the image is: docker://…, oci:PATH[:TAG], … (`sarde plugins` lists the transports)
    pub source: String,
    /// Where it goes, in the same syntax
    pub destination: String,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Fetch REF rather than IMAGE, and store it as IMAGE
    #[arg(short = 's', long, value_name = "REF")]
    pub source: Option<String>,
    /// Allow plain HTTP and unverified TLS for the registries of this command
    #[arg(long)]
    pub insecure: bool,
    /// Output format (json: one summary line)
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
    #[command(flatten)]
    pub libvirt: LibvirtFlags,
    #[command(flatten)]
    pub cache: CacheFlags,
    #[command(flatten)]
    pub vmdir: VmDirFlags,
    #[command(flatten)]
    pub transfer: TransferFlags,
    #[command(flatten)]
    pub policy: PolicyFlags,
    /// Image name[:tag|@digest] (e.g. registry.example.org/sardines/debian:12)
    pub image: String,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Fetch REF rather than IMAGE, and store it as IMAGE
    #[arg(short = 's', long, value_name = "REF")]
    pub source: Option<String>,
    #[command(flatten)]
    pub vm: ImportFlags,
    /// Allow plain HTTP and unverified TLS for the registries of this command
    #[arg(long)]
    pub insecure: bool,
    /// Output format (json: the import result and the transfer summary)
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
    #[command(flatten)]
    pub libvirt: LibvirtFlags,
    #[command(flatten)]
    pub cache: CacheFlags,
    #[command(flatten)]
    pub vmdir: VmDirFlags,
    #[command(flatten)]
    pub threads: ThreadsFlags,
    #[command(flatten)]
    pub transfer: TransferFlags,
    #[command(flatten)]
    pub policy: PolicyFlags,
    /// Image name[:tag|@digest]
    pub image: String,
}

/// What `clone` does with the new VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum CloneStartArg {
    /// Define it, leave it stopped
    #[default]
    Define,
    /// Define and start it
    Persistent,
    /// Start it as a transient VM whose overlays disappear with it
    Ephemeral,
    /// Make the overlays and print the domain XML, define nothing
    PrintXml,
}

#[derive(Debug, Args)]
pub struct CloneArgs {
    /// MAC address of the clone's first network interface (default: a new one)
    #[arg(long)]
    pub mac: Option<String>,
    /// What to do with the clone
    #[arg(long, value_enum, default_value_t)]
    pub start: CloneStartArg,
    /// Allow plain HTTP and unverified TLS when SOURCE is pulled
    #[arg(long)]
    pub insecure: bool,
    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
    #[command(flatten)]
    pub libvirt: LibvirtFlags,
    #[command(flatten)]
    pub cache: CacheFlags,
    #[command(flatten)]
    pub vmdir: VmDirFlags,
    #[command(flatten)]
    pub clones: CloneDirFlags,
    #[command(flatten)]
    pub threads: ThreadsFlags,
    #[command(flatten)]
    pub transfer: TransferFlags,
    #[command(flatten)]
    pub policy: PolicyFlags,
    /// A VM, or an image (pulled and imported when no such VM exists)
    pub source: String,
    /// Name of the clone (default: <source>-clone[-N])
    pub target: Option<String>,
}

#[derive(Debug, Args)]
pub struct LoginArgs {
    /// User name (asked for on a terminal when missing)
    #[arg(short, long)]
    pub username: Option<String>,
    /// Password (visible to other users in the process list: prefer --password-stdin)
    #[arg(short, long, conflicts_with = "password_stdin")]
    pub password: Option<String>,
    /// Read the password from standard input
    #[arg(long)]
    pub password_stdin: bool,
    /// Allow plain HTTP and unverified TLS for this registry
    #[arg(long)]
    pub insecure: bool,
    /// Registry host[:port]
    pub registry: String,
}

#[derive(Debug, Args)]
pub struct LogoutArgs {
    /// Registry host[:port], or '*' for every registry in the auth file
    pub registry: String,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
    #[command(flatten)]
    pub libvirt: LibvirtFlags,
    #[command(flatten)]
    pub cache: CacheFlags,
    #[command(flatten)]
    pub vmdir: VmDirFlags,
}

#[derive(Debug, Args)]
pub struct GetconfigArgs {
    /// IMAGE is a directory (an OCI layout) with an optional :TAG, not a name in the cache
    #[arg(long)]
    pub raw: bool,
    #[command(flatten)]
    pub cache: CacheFlags,
    /// Image name[:tag|@digest]
    pub image: String,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// IMAGE is a directory (an OCI layout) with an optional :TAG, not a name in the cache
    #[arg(long)]
    pub raw: bool,
    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
    #[command(flatten)]
    pub libvirt: LibvirtFlags,
    #[command(flatten)]
    pub cache: CacheFlags,
    #[command(flatten)]
    pub vmdir: VmDirFlags,
    /// Image name[:tag|@digest]
    pub image: String,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// The names are VMs that sarde imported: undefine them and delete their files
    #[arg(long)]
    pub vm: bool,
    /// Output format (json: one object)
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
    #[command(flatten)]
    pub libvirt: LibvirtFlags,
    #[command(flatten)]
    pub cache: CacheFlags,
    #[command(flatten)]
    pub vmdir: VmDirFlags,
    /// Images (name[:tag|@digest]) or, with --vm, VM names
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Also remove images (and with --vms, VMs) not used for this long (e.g. 7d, 12h)
    #[arg(long, value_name = "DURATION")]
    pub older_than: Option<sarde_cli::config::Age>,
    /// Remove the least recently used until the cache (with --vms: cache and VMs) fits in SIZE (e.g. 100GiB)
    #[arg(long, value_name = "SIZE")]
    pub space_budget: Option<sarde_cli::config::ByteSize>,
    /// VMs that sarde imported are candidates too, and count towards the budget
    #[arg(long)]
    pub vms: bool,
    /// Print what would be removed, remove nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Output format (json: one object)
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
    #[command(flatten)]
    pub libvirt: LibvirtFlags,
    #[command(flatten)]
    pub cache: CacheFlags,
    #[command(flatten)]
    pub vmdir: VmDirFlags,
}

#[derive(Debug, Args)]
pub struct PluginsArgs {
    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Show the configuration as SUBCOMMAND sees it (its INI section applies)
    #[arg(long = "for", value_name = "SUBCOMMAND")]
    pub for_command: Option<String>,

    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub format: OutputFormat,

    #[command(flatten)]
    pub overrides: AllFlags,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to generate completions for
    pub shell: clap_complete::Shell,
}

/// Flags that override configuration keys of the same name, in the groups of
/// `sarde_cli::config::groups`: a subcommand flattens the groups it uses, so
/// `--help` shows and the parser accepts only those.
pub trait FlagGroup {
    fn add_to(&self, flags: &mut FlagValues);
}

/// The configuration flags of a subcommand, from its groups.
pub fn flag_values(groups: &[&dyn FlagGroup]) -> FlagValues {
    let mut flags = FlagValues::default();
    for group in groups {
        group.add_to(&mut flags);
    }
    flags
}

fn set_path(flags: &mut FlagValues, key: &str, value: &Option<PathBuf>) {
    if let Some(v) = value {
        flags.set(key, v.to_string_lossy().into_owned());
    }
}

fn set_text(flags: &mut FlagValues, key: &str, value: Option<impl ToString>) {
    if let Some(v) = value {
        flags.set(key, v.to_string());
    }
}

#[derive(Debug, Args, Default)]
pub struct LibvirtFlags {
    /// libvirt connection URI (default: as libvirt chooses: LIBVIRT_DEFAULT_URI, its uri_default)
    #[arg(long, value_name = "URI")]
    pub connect: Option<String>,
}

impl FlagGroup for LibvirtFlags {
    fn add_to(&self, flags: &mut FlagValues) {
        set_text(flags, "connect", self.connect.as_ref());
    }
}

#[derive(Debug, Args, Default)]
pub struct CacheFlags {
    /// Local cache of OCI images
    #[arg(short = 'd', long, value_name = "DIR")]
    pub ocidir: Option<PathBuf>,
}

impl FlagGroup for CacheFlags {
    fn add_to(&self, flags: &mut FlagValues) {
        set_path(flags, "ocidir", &self.ocidir);
    }
}

#[derive(Debug, Args, Default)]
pub struct VmDirFlags {
    /// Directory for the disks of imported VMs
    #[arg(short = 'o', long, visible_alias = "outdir", value_name = "DIR")]
    pub vmdir: Option<PathBuf>,
}

impl FlagGroup for VmDirFlags {
    fn add_to(&self, flags: &mut FlagValues) {
        set_path(flags, "vmdir", &self.vmdir);
    }
}

#[derive(Debug, Args, Default)]
pub struct CloneDirFlags {
    /// Directory for the overlays of clones
    #[arg(long, value_name = "DIR")]
    pub clonedir: Option<PathBuf>,
}

impl FlagGroup for CloneDirFlags {
    fn add_to(&self, flags: &mut FlagValues) {
        set_path(flags, "clonedir", &self.clonedir);
    }
}

#[derive(Debug, Args, Default)]
pub struct ThreadsFlags {
    /// Worker threads (0 = one per core)
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

impl FlagGroup for ThreadsFlags {
    fn add_to(&self, flags: &mut FlagValues) {
        set_text(flags, "threads", self.threads);
    }
}

#[derive(Debug, Args, Default)]
pub struct CompressionFlags {
    /// Size of the uncompressed pieces disks are cut into (e.g. 64MiB)
    #[arg(long, value_name = "SIZE")]
    pub chunksize: Option<String>,
    /// Compression codec (see `sarde plugins`)
    #[arg(long, value_name = "NAME")]
    pub codec: Option<String>,
    /// Compression level
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub level: Option<i32>,
}

impl FlagGroup for CompressionFlags {
    fn add_to(&self, flags: &mut FlagValues) {
        set_text(flags, "chunksize", self.chunksize.as_ref());
        set_text(flags, "codec", self.codec.as_ref());
        set_text(flags, "level", self.level);
    }
}

#[derive(Debug, Args, Default)]
pub struct TransferFlags {
    /// Transport of references without a scheme (docker, oci, oci-archive, a plugin's; `sarde plugins`)
    #[arg(long, value_name = "NAME")]
    pub transport: Option<String>,
    /// Blob transfers at a time
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Retries of a request after a network error or a 5xx/429 answer
    #[arg(long, value_name = "N")]
    pub retries: Option<u32>,
}

impl FlagGroup for TransferFlags {
    fn add_to(&self, flags: &mut FlagValues) {
        set_text(flags, "transport", self.transport.as_ref());
        set_text(flags, "concurrency", self.concurrency);
        set_text(flags, "retries", self.retries);
    }
}

#[derive(Debug, Args, Default)]
pub struct PolicyFlags {
    /// containers-policy.json(5) file that decides which images are let in (default: where podman and skopeo look)
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
}

impl FlagGroup for PolicyFlags {
    fn add_to(&self, flags: &mut FlagValues) {
        set_path(flags, "policy", &self.policy);
    }
}

/// Every configuration flag, for `sarde config`.
#[derive(Debug, Args, Default)]
pub struct AllFlags {
    #[command(flatten)]
    pub libvirt: LibvirtFlags,
    #[command(flatten)]
    pub cache: CacheFlags,
    #[command(flatten)]
    pub vmdir: VmDirFlags,
    #[command(flatten)]
    pub clones: CloneDirFlags,
    #[command(flatten)]
    pub threads: ThreadsFlags,
    #[command(flatten)]
    pub compression: CompressionFlags,
    #[command(flatten)]
    pub transfer: TransferFlags,
    #[command(flatten)]
    pub policy: PolicyFlags,
}

impl FlagGroup for AllFlags {
    fn add_to(&self, flags: &mut FlagValues) {
        for group in [
            &self.libvirt as &dyn FlagGroup,
            &self.cache,
            &self.vmdir,
            &self.clones,
            &self.threads,
            &self.compression,
            &self.transfer,
            &self.policy,
        ] {
            group.add_to(flags);
        }
    }
}

impl ExportArgs {
    pub fn flag_values(&self) -> FlagValues {
        flag_values(&[&self.libvirt, &self.cache, &self.compression, &self.threads])
    }
}

impl ImportArgs {
    pub fn flag_values(&self) -> FlagValues {
        flag_values(&[&self.libvirt, &self.cache, &self.vmdir, &self.threads])
    }
}

impl PushArgs {
    pub fn flag_values(&self) -> FlagValues {
        flag_values(&[&self.cache, &self.transfer])
    }
}

impl CopyArgs {
    pub fn flag_values(&self) -> FlagValues {
        flag_values(&[&self.cache, &self.transfer, &self.policy])
    }
}

impl FetchArgs {
    pub fn flag_values(&self) -> FlagValues {
        flag_values(&[
            &self.libvirt,
            &self.cache,
            &self.vmdir,
            &self.transfer,
            &self.policy,
        ])
    }
}

impl PullArgs {
    pub fn flag_values(&self) -> FlagValues {
        flag_values(&[
            &self.libvirt,
            &self.cache,
            &self.vmdir,
            &self.threads,
            &self.transfer,
            &self.policy,
        ])
    }
}

impl CloneArgs {
    pub fn flag_values(&self) -> FlagValues {
        flag_values(&[
            &self.libvirt,
            &self.cache,
            &self.vmdir,
            &self.clones,
            &self.threads,
            &self.transfer,
            &self.policy,
        ])
    }
}

impl LoginArgs {
    pub fn flag_values(&self) -> FlagValues {
        flag_values(&[])
    }
}

impl LogoutArgs {
    pub fn flag_values(&self) -> FlagValues {
        flag_values(&[])
    }
}

impl ListArgs {
    pub fn flag_values(&self) -> FlagValues {
        flag_values(&[&self.libvirt, &self.cache, &self.vmdir])
    }
}

impl GetconfigArgs {
    pub fn flag_values(&self) -> FlagValues {
        flag_values(&[&self.cache])
    }
}

impl InspectArgs {
    pub fn flag_values(&self) -> FlagValues {
        flag_values(&[&self.libvirt, &self.cache, &self.vmdir])
    }
}

impl RmArgs {
    pub fn flag_values(&self) -> FlagValues {
        flag_values(&[&self.libvirt, &self.cache, &self.vmdir])
    }
}

impl PruneArgs {
    pub fn flag_values(&self) -> FlagValues {
        flag_values(&[&self.libvirt, &self.cache, &self.vmdir])
    }
}
