//! The LiteRT engine for TFLite bundles: edgepack's own prefill/decode loop over a generative
//! `.tflite` (a `prefill_<L>` and a `decode` signature, the KV cache as explicit inputs and
//! outputs, static shapes), through LiteRT's C API (`libLiteRt.so`) loaded at run time.
//!
//! The tokenizer, its config (with the chat template) and `edgepack.json` are read from the
//! model's own metadata, so the `.tflite` file is the whole model.
//!
//! The cache lives in two sets of buffers: each call reads one set and writes the other, and
//! the next call swaps them, so the cache is never copied between steps. Both signatures
//! share the two sets (their cache tensors have one shape).
//!
//! The C API is declared here by hand for the pinned LiteRT (ai-edge-litert 2.3, the wheel
//! `cargo xtask dist` takes the board's library from); every symbol is looked up before the
//! first call, so another build of the library is refused by the missing name, not a crash.

use std::alloc::{self, Layout as AllocLayout};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::path::Path;
use std::sync::mpsc;

use libloading::Library;
use serde_json::Value as Json;

use super::generate::{self, Job};
use super::hf::HfVocab;
use super::load::Load;
use super::types::{EngineConfig, EngineError, Forward, ModelInfo};

const ENGINE: &str = "litert";

/// `LITERT_TENSOR_MAX_RANK`.
const MAX_RANK: usize = 8;
/// `LITERT_HOST_MEMORY_BUFFER_ALIGNMENT`: host buffers LiteRT binds without copying.
const ALIGN: usize = 64;
/// Largest buffer the engine allocates for one tensor (a hostile shape is refused, not
/// allocated).
const MAX_TENSOR_BYTES: usize = 1 << 34;

/// `kLiteRtElementType*`.
const F32: c_int = 1;
const I32: c_int = 2;

/// `kLiteRtHwAcceleratorCpu`.
const HW_CPU: c_int = 1;

type Handle = *mut c_void;
type Status = c_int;

/// `LiteRtLayout`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawLayout {
    /// `rank : 7` and `has_strides : 1` bit-fields in one `unsigned int`.
    bits: c_uint,
    dimensions: [i32; MAX_RANK],
    strides: [u32; MAX_RANK],
}

/// `LiteRtRankedTensorType` (72 bytes on 64-bit targets).
#[repr(C)]
#[derive(Clone, Copy)]
struct RankedType {
    element_type: c_int,
    layout: RawLayout,
}

const _: () = assert!(std::mem::size_of::<RankedType>() == 72);

impl RankedType {
    fn dims(&self) -> &[i32] {
        let rank = (self.layout.bits & 0x7f) as usize;
        &self.layout.dimensions[..rank.min(MAX_RANK)]
    }

    fn element_bytes(&self) -> Option<usize> {
        Some(match self.element_type {
            1 | 2 | 16 => 4,          // f32, i32, u32
            4 | 11 | 13 | 8 => 8,     // i64, f64, u64, complex64
            7 | 10 | 17 | 19 => 2,    // i16, f16, u16, bf16
            9 | 3 | 6 | 22 | 23 => 1, // i8, u8, bool, f8
            _ => return None,
        })
    }

    /// Bytes of a dense tensor of this type, or why it has no fixed size.
    fn bytes(&self) -> Result<usize, String> {
        let elem = self
            .element_bytes()
            .ok_or_else(|| format!("element type {} is not supported", self.element_type))?;
        let mut n = elem;
        for &d in self.dims() {
            let d = usize::try_from(d).map_err(|_| "a dynamic dimension".to_string())?;
            n = n
                .checked_mul(d)
                .filter(|&n| n <= MAX_TENSOR_BYTES)
                .ok_or_else(|| format!("shape {:?} is too large", self.dims()))?;
        }
        Ok(n)
    }
}

fn status_name(s: Status) -> &'static str {
    match s {
        1 => "invalid argument",
        2 => "memory allocation failure",
        3 => "runtime failure",
        4 => "missing input tensor",
        5 => "unsupported",
        6 => "not found",
        8 => "wrong version",
        500 => "file I/O",
        501 => "invalid flatbuffer",
        502 => "dynamic loading",
        504 => "compilation",
        _ => "error",
    }
}

macro_rules! api {
    ($($field:ident : $sym:literal => fn($($arg:ty),*) $(-> $ret:ty)?;)*) => {
        /// The C functions of `libLiteRt.so` the engine calls.
        struct Api {
            $($field: unsafe extern "C" fn($($arg),*) $(-> $ret)?,)*
            /// Keeps the functions above valid.
            _lib: Library,
        }

        impl Api {
            /// Loads the library and every symbol, naming the first one missing.
            fn load(path: &Path) -> Result<Api, String> {
                // SAFETY: loading runs the library's initialisers; the file is the LiteRT
                // library the board image or the verified bundle provides, checked to be an
                // ELF file for this CPU. Each symbol is declared with the signature of the
                // pinned LiteRT's C headers.
                unsafe {
                    let lib = Library::new(path).map_err(|e| format!("cannot load: {e}"))?;
                    $(
                        let $field = *lib
                            .get::<unsafe extern "C" fn($($arg),*) $(-> $ret)?>(concat!($sym, "\0").as_bytes())
                            .map_err(|_| format!(
                                "not a LiteRT 2.x C API library (no symbol {})", $sym
                            ))?;
                    )*
                    Ok(Api { $($field,)* _lib: lib })
                }
            }
        }
    };
}

api! {
    create_environment: "LiteRtCreateEnvironment" => fn(c_int, *const c_void, *mut Handle) -> Status;
    destroy_environment: "LiteRtDestroyEnvironment" => fn(Handle);
    create_model_from_file: "LiteRtCreateModelFromFile" => fn(Handle, *const c_char, *mut Handle) -> Status;
    destroy_model: "LiteRtDestroyModel" => fn(Handle);
    get_model_metadata: "LiteRtGetModelMetadata" => fn(Handle, *const c_char, *mut *const c_void, *mut usize) -> Status;
    get_num_model_signatures: "LiteRtGetNumModelSignatures" => fn(Handle, *mut usize) -> Status;
    get_model_signature: "LiteRtGetModelSignature" => fn(Handle, usize, *mut Handle) -> Status;
    get_signature_key: "LiteRtGetSignatureKey" => fn(Handle, *mut *const c_char) -> Status;
    get_num_signature_inputs: "LiteRtGetNumSignatureInputs" => fn(Handle, *mut usize) -> Status;
    get_num_signature_outputs: "LiteRtGetNumSignatureOutputs" => fn(Handle, *mut usize) -> Status;
    get_signature_input_name: "LiteRtGetSignatureInputName" => fn(Handle, usize, *mut *const c_char) -> Status;
    get_signature_output_name: "LiteRtGetSignatureOutputName" => fn(Handle, usize, *mut *const c_char) -> Status;
    get_signature_input_tensor: "LiteRtGetSignatureInputTensorByIndex" => fn(Handle, usize, *mut Handle) -> Status;
    get_signature_output_tensor: "LiteRtGetSignatureOutputTensorByIndex" => fn(Handle, usize, *mut Handle) -> Status;
    get_ranked_tensor_type: "LiteRtGetRankedTensorType" => fn(Handle, *mut RankedType) -> Status;
    create_options: "LiteRtCreateOptions" => fn(*mut Handle) -> Status;
    destroy_options: "LiteRtDestroyOptions" => fn(Handle);
    set_options_hardware_accelerators: "LiteRtSetOptionsHardwareAccelerators" => fn(Handle, c_int) -> Status;
    create_opaque_options: "LiteRtCreateOpaqueOptions" => fn(*const c_char, *mut c_void, Option<unsafe extern "C" fn(*mut c_void)>, *mut Handle) -> Status;
    add_opaque_options: "LiteRtAddOpaqueOptions" => fn(Handle, Handle) -> Status;
    create_compiled_model: "LiteRtCreateCompiledModel" => fn(Handle, Handle, Handle, *mut Handle) -> Status;
    destroy_compiled_model: "LiteRtDestroyCompiledModel" => fn(Handle);
    create_tensor_buffer_from_host_memory: "LiteRtCreateTensorBufferFromHostMemory" => fn(*const RankedType, *mut c_void, usize, Option<unsafe extern "C" fn(*mut c_void)>, *mut Handle) -> Status;
    destroy_tensor_buffer: "LiteRtDestroyTensorBuffer" => fn(Handle);
    run_compiled_model: "LiteRtRunCompiledModel" => fn(Handle, usize, usize, *mut Handle, usize, *mut Handle) -> Status;
    create_accelerator: "LiteRtCreateAccelerator" => fn(*mut Handle) -> Status;
    destroy_accelerator: "LiteRtDestroyAccelerator" => fn(Handle) -> Status;
    register_accelerator: "LiteRtRegisterAccelerator" => fn(Handle, Handle, *mut c_void, Option<unsafe extern "C" fn(*mut c_void)>) -> Status;
    set_accelerator_get_name: "LiteRtSetAcceleratorGetName" => fn(Handle, unsafe extern "C" fn(*const c_void, *mut *const c_char) -> Status) -> Status;
    set_accelerator_get_version: "LiteRtSetAcceleratorGetVersion" => fn(Handle, unsafe extern "C" fn(*const c_void, *mut ApiVersion) -> Status) -> Status;
    set_accelerator_get_hardware_support: "LiteRtSetAcceleratorGetHardwareSupport" => fn(Handle, unsafe extern "C" fn(*const c_void, *mut c_int) -> Status) -> Status;
    set_delegate_function: "LiteRtSetDelegateFunction" => fn(Handle, CreateDelegateFn) -> Status;
    set_jit_responsibility: "LiteRtSetIsAcceleratorDelegateResponsibleForJitCompilation" => fn(Handle, unsafe extern "C" fn(*const c_void, *mut bool) -> Status) -> Status;
    wrap_delegate: "LiteRtWrapDelegate" => fn(*mut c_void, Option<unsafe extern "C" fn(*mut c_void)>, *mut Handle) -> Status;
}

/// `LiteRtApiVersion`.
#[repr(C)]
struct ApiVersion {
    major: c_int,
    minor: c_int,
    patch: c_int,
}

/// `LiteRtAny` holding an integer, and `LiteRtEnvOption`.
#[repr(C)]
struct EnvOption {
    tag: c_int,
    any_type: c_int,
    value: i64,
}

/// `kLiteRtEnvOptionTagAutoRegisterAccelerators`, `kLiteRtEnvOptionTagMinLoggerSeverity`,
/// `kLiteRtAnyTypeInt`, `kLiteRtLogSeverityWarning`.
const OPT_AUTO_REGISTER: c_int = 24;
const OPT_MIN_LOG_SEVERITY: c_int = 25;
const ANY_INT: c_int = 2;
const LOG_WARNING: i64 = 2;

/// Delegates the accelerator callback has handed to LiteRT.
static DELEGATES_MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

type CreateDelegateFn =
    unsafe extern "C" fn(*mut c_void, Handle, *const c_void, Handle, *mut Handle) -> Status;

/// `tflite_plugin_create_delegate(keys, values, n, report_error)` and its destroyer: the C ABI
/// of TFLite external delegates (`external_delegate_interface.h`).
type PluginCreate = unsafe extern "C" fn(
    *const *const c_char,
    *const *const c_char,
    usize,
    Option<unsafe extern "C" fn(*const c_char)>,
) -> *mut c_void;
type PluginDestroy = unsafe extern "C" fn(*mut c_void);

/// The loaded external delegate, for the accelerator callbacks (LiteRT passes them no state
/// of ours). One per process: a runtime serves one bundle.
struct Plugin {
    create: PluginCreate,
    destroy: PluginDestroy,
    wrap: unsafe extern "C" fn(
        *mut c_void,
        Option<unsafe extern "C" fn(*mut c_void)>,
        *mut Handle,
    ) -> Status,
}

static PLUGIN: std::sync::Mutex<Option<Plugin>> = std::sync::Mutex::new(None);
/// What the delegate reported through its error callback.
static PLUGIN_ERRORS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

impl Plugin {
    /// Loads the delegate library at `path` and makes it the one the accelerator creates.
    fn load(api: &Api, path: &Path) -> Result<(), String> {
        // SAFETY: loading runs the library's initialisers; the file is the board image's
        // delegate library (or the one asked for by --delegate), checked to be an ELF file
        // for this CPU. The two symbols have the external delegate C ABI.
        unsafe {
            let lib =
                Library::new(path).map_err(|e| format!("{}: cannot load: {e}", path.display()))?;
            let create = *lib
                .get::<PluginCreate>(b"tflite_plugin_create_delegate\0")
                .map_err(|_| {
                    format!(
                        "{}: not a TFLite external delegate (no tflite_plugin_create_delegate)",
                        path.display()
                    )
                })?;
            let destroy = *lib
                .get::<PluginDestroy>(b"tflite_plugin_destroy_delegate\0")
                .map_err(|_| {
                    format!(
                        "{}: not a TFLite external delegate (no tflite_plugin_destroy_delegate)",
                        path.display()
                    )
                })?;
            // Delegates may not be unloaded while a model uses them: kept for the process.
            std::mem::forget(lib);
            *PLUGIN.lock().unwrap_or_else(|p| p.into_inner()) = Some(Plugin {
                create,
                destroy,
                wrap: api.wrap_delegate,
            });
        }
        Ok(())
    }
}

fn plugin_errors() -> String {
    let errs = std::mem::take(&mut *PLUGIN_ERRORS.lock().unwrap_or_else(|p| p.into_inner()));
    if errs.is_empty() {
        String::new()
    } else {
        format!(" (delegate said: {})", errs.join("; "))
    }
}

unsafe extern "C" fn plugin_report_error(msg: *const c_char) {
    // SAFETY: the delegate passes a NUL-terminated message or null.
    let m = unsafe { c_str(msg) };
    let mut errs = PLUGIN_ERRORS.lock().unwrap_or_else(|p| p.into_inner());
    if errs.len() < 16 {
        errs.push(m);
    }
}

unsafe extern "C" fn accel_name(_: *const c_void, name: *mut *const c_char) -> Status {
    if name.is_null() {
        return 1;
    }
    // SAFETY: LiteRT passes a valid out-pointer; the string is static.
    unsafe { *name = c"edgepack-external-delegate".as_ptr() };
    0
}

unsafe extern "C" fn accel_version(_: *const c_void, v: *mut ApiVersion) -> Status {
    if v.is_null() {
        return 1;
    }
    // SAFETY: valid out-pointer from LiteRT.
    unsafe {
        *v = ApiVersion {
            major: 1,
            minor: 0,
            patch: 0,
        }
    };
    0
}

/// Declared a CPU-side accelerator: LiteRT 2.3 applies accelerators that claim the NPU only
/// through its own dispatch libraries, and never calls their delegate function. Which nodes
/// go to the NPU is the external delegate's own decision either way.
unsafe extern "C" fn accel_hardware(_: *const c_void, set: *mut c_int) -> Status {
    if set.is_null() {
        return 1;
    }
    // SAFETY: valid out-pointer from LiteRT.
    unsafe { *set = HW_CPU };
    0
}

/// Not responsible for JIT compilation: LiteRT applies it whatever hardware was asked for.
unsafe extern "C" fn accel_jit(_: *const c_void, jit: *mut bool) -> Status {
    if jit.is_null() {
        return 1;
    }
    // SAFETY: valid out-pointer from LiteRT.
    unsafe { *jit = false };
    0
}

unsafe extern "C" fn accel_create_delegate(
    _: *mut c_void,
    _: Handle,
    _: *const c_void,
    _: Handle,
    out: *mut Handle,
) -> Status {
    let guard = PLUGIN.lock().unwrap_or_else(|p| p.into_inner());
    let Some(p) = guard.as_ref() else {
        return 6;
    };
    if out.is_null() {
        return 1;
    }
    // SAFETY: the plugin's create takes no options here (null arrays of length 0) and an
    // error callback; it returns a delegate it owns until `destroy`, which the wrapper calls.
    unsafe {
        let d = (p.create)(
            std::ptr::null(),
            std::ptr::null(),
            0,
            Some(plugin_report_error),
        );
        if d.is_null() {
            return 3;
        }
        let s = (p.wrap)(d, Some(p.destroy), out);
        if s != 0 {
            (p.destroy)(d);
        } else {
            DELEGATES_MADE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        s
    }
}

/// Creates the environment, loads the model and compiles it for `threads` threads: on the CPU
/// (XNNPACK), or with the loaded external delegate applied first (`with_delegate`: LiteRT's
/// own accelerators are not registered, so the delegate sees the whole graph before the
/// interpreter's default XNNPACK delegate takes what it leaves). Everything made is released
/// on failure.
fn open_model(
    api: &Api,
    path: &Path,
    with_delegate: bool,
    threads: i32,
) -> Result<(Handle, Handle, Handle), String> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| "the path holds a NUL byte".to_string())?;
    let mut opts = vec![EnvOption {
        tag: OPT_MIN_LOG_SEVERITY,
        any_type: ANY_INT,
        value: LOG_WARNING,
    }];
    if with_delegate {
        opts.push(EnvOption {
            tag: OPT_AUTO_REGISTER,
            any_type: ANY_INT,
            value: 0,
        });
    }
    let (mut env, mut model, mut compiled, mut options) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
    // SAFETY: LiteRT C calls with valid handles and out-pointers. The accelerator passes to
    // the environment on registration (destroyed here only if that fails); the options are
    // the caller's after compilation; the opaque CPU options own their payload once created.
    let r = unsafe {
        (|| -> Result<(), String> {
            check(
                "LiteRtCreateEnvironment",
                (api.create_environment)(opts.len() as c_int, opts.as_ptr().cast(), &mut env),
            )?;
            if with_delegate {
                let mut acc = std::ptr::null_mut();
                check(
                    "LiteRtCreateAccelerator",
                    (api.create_accelerator)(&mut acc),
                )?;
                let set = (|| {
                    check(
                        "LiteRtSetAcceleratorGetName",
                        (api.set_accelerator_get_name)(acc, accel_name),
                    )?;
                    check(
                        "LiteRtSetAcceleratorGetVersion",
                        (api.set_accelerator_get_version)(acc, accel_version),
                    )?;
                    check(
                        "LiteRtSetAcceleratorGetHardwareSupport",
                        (api.set_accelerator_get_hardware_support)(acc, accel_hardware),
                    )?;
                    check(
                        "LiteRtSetDelegateFunction",
                        (api.set_delegate_function)(acc, accel_create_delegate),
                    )?;
                    check(
                        "LiteRtSetIsAcceleratorDelegateResponsibleForJitCompilation",
                        (api.set_jit_responsibility)(acc, accel_jit),
                    )
                })();
                if let Err(e) = set {
                    (api.destroy_accelerator)(acc);
                    return Err(e);
                }
                check(
                    "LiteRtRegisterAccelerator",
                    (api.register_accelerator)(env, acc, std::ptr::null_mut(), None),
                )?;
            }
            check(
                "LiteRtCreateModelFromFile",
                (api.create_model_from_file)(env, c_path.as_ptr(), &mut model),
            )?;
            check("LiteRtCreateOptions", (api.create_options)(&mut options))?;
            check(
                "LiteRtSetOptionsHardwareAccelerators",
                (api.set_options_hardware_accelerators)(options, HW_CPU),
            )?;
            {
                let payload = CString::new(format!("num_threads = {threads}\n"))
                    .expect("no NUL")
                    .into_raw();
                let mut opaque = std::ptr::null_mut();
                let s = (api.create_opaque_options)(
                    c"xnnpack".as_ptr(),
                    payload.cast(),
                    Some(free_c_string),
                    &mut opaque,
                );
                if s != 0 {
                    free_c_string(payload.cast());
                }
                check("LiteRtCreateOpaqueOptions (CPU threads)", s)?;
                check(
                    "LiteRtAddOpaqueOptions",
                    (api.add_opaque_options)(options, opaque),
                )?;
            }
            let made = DELEGATES_MADE.load(std::sync::atomic::Ordering::SeqCst);
            check(
                "LiteRtCreateCompiledModel",
                (api.create_compiled_model)(env, model, options, &mut compiled),
            )?;
            if with_delegate && DELEGATES_MADE.load(std::sync::atomic::Ordering::SeqCst) == made {
                return Err("LiteRT compiled the model without asking for the delegate".into());
            }
            Ok(())
        })()
    };
    // SAFETY: each handle is null or from its create call, released once, dependants first.
    unsafe {
        if !options.is_null() {
            (api.destroy_options)(options);
        }
        if r.is_err() {
            if !compiled.is_null() {
                (api.destroy_compiled_model)(compiled);
            }
            if !model.is_null() {
                (api.destroy_model)(model);
            }
            if !env.is_null() {
                (api.destroy_environment)(env);
            }
        }
    }
    r.map(|()| (env, model, compiled))
}

/// Turns a LiteRT status into a message naming the call.
fn check(what: &str, s: Status) -> Result<(), String> {
    if s == 0 {
        Ok(())
    } else {
        Err(format!("{what} failed: {} ({s})", status_name(s)))
    }
}

/// # Safety
/// `p` is null or a NUL-terminated string that lives as long as the returned one is used.
unsafe fn c_str(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// A zeroed, 64-byte aligned host allocation bound to a LiteRT tensor buffer.
struct HostBuffer {
    ptr: *mut u8,
    len: usize,
    handle: Handle,
}

impl HostBuffer {
    fn new(api: &Api, ty: &RankedType, len: usize) -> Result<HostBuffer, String> {
        let layout = AllocLayout::from_size_align(len.max(1), ALIGN)
            .map_err(|e| format!("cannot lay out {len} bytes: {e}"))?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(format!("cannot allocate {len} bytes"));
        }
        let mut b = HostBuffer {
            ptr,
            len,
            handle: std::ptr::null_mut(),
        };
        // SAFETY: `ptr` points to `len` writable, aligned bytes that outlive the tensor
        // buffer (Drop destroys the buffer first); no deallocator, the memory stays ours.
        let s = unsafe {
            (api.create_tensor_buffer_from_host_memory)(
                ty,
                b.ptr.cast(),
                b.len,
                None,
                &mut b.handle,
            )
        };
        check("LiteRtCreateTensorBufferFromHostMemory", s)?;
        Ok(b)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `len` initialised (zeroed, then written) bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: as in `bytes_mut`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    fn release(&mut self, api: &Api) {
        if !self.handle.is_null() {
            // SAFETY: the handle came from LiteRtCreateTensorBufferFromHostMemory and is
            // destroyed once.
            unsafe { (api.destroy_tensor_buffer)(self.handle) };
            self.handle = std::ptr::null_mut();
        }
        if !self.ptr.is_null() {
            // SAFETY: allocated in `new` with this size and alignment.
            unsafe {
                alloc::dealloc(
                    self.ptr,
                    AllocLayout::from_size_align_unchecked(self.len.max(1), ALIGN),
                )
            };
            self.ptr = std::ptr::null_mut();
        }
    }
}

/// Where a signature's input or output goes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Tokens,
    Positions,
    Logits,
    /// The n-th cache tensor (in the decode signature's input order).
    Cache(usize),
}

/// One signature, with its buffers in call order.
struct Sig {
    index: usize,
    key: String,
    /// Tokens per call.
    t: usize,
    inputs: Vec<Slot>,
    outputs: Vec<Slot>,
    tokens: HostBuffer,
    positions: HostBuffer,
    logits: HostBuffer,
}

/// A tensor of a signature as the model declares it.
struct Port {
    name: String,
    ty: RankedType,
}

fn sig_ports(api: &Api, sig: Handle, inputs: bool) -> Result<Vec<Port>, String> {
    let mut n = 0usize;
    // SAFETY: `sig` is a signature handle of a live model; out-pointers are valid.
    unsafe {
        let (count, name_of, tensor_of) = if inputs {
            (
                api.get_num_signature_inputs,
                api.get_signature_input_name,
                api.get_signature_input_tensor,
            )
        } else {
            (
                api.get_num_signature_outputs,
                api.get_signature_output_name,
                api.get_signature_output_tensor,
            )
        };
        check("LiteRtGetNumSignatureInputs/Outputs", count(sig, &mut n))?;
        if n > 4096 {
            return Err(format!("{n} signature tensors"));
        }
        (0..n)
            .map(|i| {
                let mut name = std::ptr::null();
                check("LiteRtGetSignatureInputName", name_of(sig, i, &mut name))?;
                let mut tensor = std::ptr::null_mut();
                check(
                    "LiteRtGetSignatureInputTensor",
                    tensor_of(sig, i, &mut tensor),
                )?;
                let mut ty: RankedType = std::mem::zeroed();
                check(
                    "LiteRtGetRankedTensorType",
                    (api.get_ranked_tensor_type)(tensor, &mut ty),
                )?;
                Ok(Port {
                    name: c_str(name),
                    ty,
                })
            })
            .collect()
    }
}

/// What `edgepack.json` in the model's metadata says (written by `edgepack export tflite`).
struct About {
    eos: Vec<u32>,
    chat_template: Option<String>,
}

fn read_about(v: Option<&Json>) -> Result<About, String> {
    let Some(v) = v else {
        return Ok(About {
            eos: Vec::new(),
            chat_template: None,
        });
    };
    let eos = match v.get("eos_token_id") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or("eos_token_id: not a list of token ids")?,
        Some(x) => vec![x
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or("eos_token_id: not a token id")?],
    };
    let chat_template = match v.get("chat_template") {
        None | Some(Json::Null) => None,
        Some(Json::String(s)) => Some(s.clone()),
        Some(_) => return Err("chat_template: not a string".into()),
    };
    Ok(About { eos, chat_template })
}

/// Loads the model and serves jobs until the handle is dropped.
pub fn run(
    config: EngineConfig,
    jobs: mpsc::Receiver<Job>,
    ready: mpsc::Sender<Result<ModelInfo, EngineError>>,
    tally: &Load,
) {
    match load(&config) {
        Ok((vocab, mut fwd, info)) => generate::serve(&vocab, &mut fwd, info, jobs, ready, tally),
        Err(e) => {
            let _ = ready.send(Err(e));
        }
    }
}

fn load_err(path: &Path, reason: impl std::fmt::Display) -> EngineError {
    EngineError::Load {
        engine: ENGINE,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn decode_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Decode {
        engine: ENGINE,
        reason: e.to_string(),
    }
}

/// Frees a CPU options payload made by `CString::into_raw`.
unsafe extern "C" fn free_c_string(p: *mut c_void) {
    if !p.is_null() {
        // SAFETY: `p` came from `CString::into_raw` in `load` and is freed once, by LiteRT.
        drop(unsafe { CString::from_raw(p.cast()) });
    }
}

/// The engine's library version: from a versioned file name (`libLiteRt.so.2.3.0`, as
/// `cargo xtask dist` names the wheel's library), else unknown (the C API has no version call).
fn library_version(lib: &Path) -> String {
    lib.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("libLiteRt.so."))
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| "unknown".into())
}

fn load(config: &EngineConfig) -> Result<(HfVocab, LiteRtForward, ModelInfo), EngineError> {
    let path = &config.model_path;
    let lib = config.library.as_deref().ok_or_else(|| {
        EngineError::Library("the LiteRT engine needs LiteRT's library (--engine-lib)".into())
    })?;
    let api =
        Api::load(lib).map_err(|e| EngineError::Library(format!("{}: {e}", lib.display())))?;
    let mut fwd = LiteRtForward {
        api,
        env: std::ptr::null_mut(),
        model: std::ptr::null_mut(),
        compiled: std::ptr::null_mut(),
        prefill: None,
        decode: None,
        caches: [Vec::new(), Vec::new()],
        current: 0,
        len: 0,
        n_ctx: 0,
        vocab: 0,
        logits: Vec::new(),
    };
    let threads = config.threads.max(1);
    // The delegate first, where the bundle asks for one and its library is here; on any
    // failure the plain model on the CPU, with the reason kept for /v1/models and /metrics.
    let mut delegate = None;
    let mut delegate_fallback = None;
    let mut model_path = path.clone();
    if let Some(plan) = &config.delegate {
        let attempt = match &plan.library {
            None => Err(format!(
                "no {} delegate library ({})",
                plan.name, plan.searched
            )),
            Some(lib) => Plugin::load(&fwd.api, lib).and_then(|()| {
                let m = plan.model.clone().unwrap_or_else(|| path.clone());
                open_model(&fwd.api, &m, true, threads)
                    .map(|o| (o, m))
                    .map_err(|e| {
                        format!(
                            "the {} delegate ({}) did not take the model: {e}{}",
                            plan.name,
                            lib.display(),
                            plugin_errors()
                        )
                    })
            }),
        };
        match attempt {
            Ok((opened, m)) => {
                (fwd.env, fwd.model, fwd.compiled) = opened;
                model_path = m;
                delegate = Some(plan.name.clone());
                tracing::info!(delegate = %plan.name, model = %model_path.display(), "LiteRT model compiled with the delegate");
            }
            Err(reason) => {
                tracing::warn!(delegate = %plan.name, %reason, "running on the CPU (XNNPACK) instead");
                delegate_fallback = Some(reason);
            }
        }
    }
    if fwd.compiled.is_null() {
        (fwd.env, fwd.model, fwd.compiled) =
            open_model(&fwd.api, path, false, threads).map_err(|e| load_err(path, e))?;
    }
    let path = &model_path;
    let api = &fwd.api;
    let meta = |key: &str| -> Result<Option<Vec<u8>>, EngineError> {
        let k = CString::new(key).expect("a metadata key has no NUL");
        let (mut p, mut n) = (std::ptr::null(), 0usize);
        // SAFETY: the model is live; LiteRT points `p` at `n` bytes it owns, copied at once.
        let s = unsafe { (api.get_model_metadata)(fwd.model, k.as_ptr(), &mut p, &mut n) };
        if s != 0 || p.is_null() {
            return Ok(None);
        }
        // SAFETY: as above.
        Ok(Some(
            unsafe { std::slice::from_raw_parts(p.cast::<u8>(), n) }.to_vec(),
        ))
    };
    let json = |key: &str| -> Result<Option<Json>, EngineError> {
        meta(key)?
            .map(|b| {
                serde_json::from_slice(&b)
                    .map_err(|e| load_err(path, format!("metadata {key}: not JSON: {e}")))
            })
            .transpose()
    };
    let tok = meta("tokenizer.json")?.ok_or_else(|| {
        load_err(
            path,
            "metadata tokenizer.json: missing (the LiteRT engine reads the tokenizer from the model)",
        )
    })?;
    let tok =
        String::from_utf8(tok).map_err(|_| load_err(path, "metadata tokenizer.json: not UTF-8"))?;
    let mut tok_config = json("tokenizer_config.json")?;
    let about_json = json("edgepack.json")?;
    let about = read_about(about_json.as_ref())
        .map_err(|e| load_err(path, format!("metadata edgepack.json: field {e}")))?;
    // The template edgepack.json carries wins over a config without one.
    if let (Some(t), Some(Json::Object(cfg))) = (&about.chat_template, tok_config.as_mut()) {
        cfg.entry("chat_template")
            .or_insert_with(|| Json::String(t.clone()));
    }
    let prompter = edgepack_text::Prompter::new(&tok, tok_config.as_ref(), None)
        .map_err(|e| load_err(path, format!("metadata {}: {}", e.field, e.message)))?;

    // Signatures.
    let mut n_sigs = 0usize;
    // SAFETY: live model, valid out-pointer.
    unsafe {
        check(
            "LiteRtGetNumModelSignatures",
            (api.get_num_model_signatures)(fwd.model, &mut n_sigs),
        )
        .map_err(|e| load_err(path, e))?;
    }
    let mut found: Vec<(usize, String, Vec<Port>, Vec<Port>)> = Vec::new();
    for i in 0..n_sigs.min(64) {
        let mut sig = std::ptr::null_mut();
        let mut key = std::ptr::null();
        // SAFETY: live model, index below the count, valid out-pointers.
        let key = unsafe {
            check(
                "LiteRtGetModelSignature",
                (api.get_model_signature)(fwd.model, i, &mut sig),
            )
            .map_err(|e| load_err(path, e))?;
            check(
                "LiteRtGetSignatureKey",
                (api.get_signature_key)(sig, &mut key),
            )
            .map_err(|e| load_err(path, e))?;
            c_str(key)
        };
        if key == "decode" || key.starts_with("prefill_") {
            let ins = sig_ports(api, sig, true).map_err(|e| load_err(path, e))?;
            let outs = sig_ports(api, sig, false).map_err(|e| load_err(path, e))?;
            found.push((i, key, ins, outs));
        }
    }
    let decode_at = found
        .iter()
        .position(|f| f.1 == "decode")
        .ok_or_else(|| load_err(path, "no decode signature (a generative export has one)"))?;
    let (d_index, d_key, d_ins, d_outs) = found.remove(decode_at);
    // The widest prefill signature, if any; without one the prompt goes token by token.
    found.sort_by_key(|f| {
        f.1.trim_start_matches("prefill_")
            .parse::<usize>()
            .unwrap_or(0)
    });
    let prefill = found.pop();

    // The cache: every decode input but tokens and input_pos, each with an output of that name.
    let cache: Vec<&Port> = d_ins
        .iter()
        .filter(|p| p.name != "tokens" && p.name != "input_pos")
        .collect();
    if cache.is_empty() {
        return Err(load_err(path, "signature decode: no KV cache inputs"));
    }
    let mut cache_bytes = Vec::with_capacity(cache.len());
    for p in &cache {
        let out = d_outs.iter().find(|o| o.name == p.name).ok_or_else(|| {
            load_err(
                path,
                format!(
                    "signature decode: input {} has no output of that name",
                    p.name
                ),
            )
        })?;
        if out.ty.element_type != p.ty.element_type || out.ty.dims() != p.ty.dims() {
            return Err(load_err(
                path,
                format!(
                    "signature decode: {} differs between input and output",
                    p.name
                ),
            ));
        }
        cache_bytes.push(
            p.ty.bytes()
                .map_err(|e| load_err(path, format!("signature decode input {}: {e}", p.name)))?,
        );
    }
    // BTNH caches: the second dimension is the context.
    let n_ctx = cache[0]
        .ty
        .dims()
        .get(1)
        .and_then(|&s| u32::try_from(s).ok())
        .filter(|&s| s > 0)
        .ok_or_else(|| {
            load_err(
                path,
                format!(
                    "signature decode: cache {} is not [1, S, heads, dim]",
                    cache[0].name
                ),
            )
        })?;
    let cache_names: Vec<String> = cache.iter().map(|p| p.name.clone()).collect();
    let cache_types: Vec<RankedType> = cache.iter().map(|p| p.ty).collect();

    let mut vocab_size = 0usize;
    let mut make_sig = |index: usize,
                        key: &str,
                        ins: &[Port],
                        outs: &[Port]|
     -> Result<Sig, String> {
        let slot = |p: &Port| -> Result<Slot, String> {
            match p.name.as_str() {
                "tokens" => Ok(Slot::Tokens),
                "input_pos" => Ok(Slot::Positions),
                "logits" => Ok(Slot::Logits),
                n => cache_names
                    .iter()
                    .position(|c| c == n)
                    .map(Slot::Cache)
                    .ok_or_else(|| format!("tensor {n} is not tokens, input_pos, logits or a cache of the decode signature")),
            }
        };
        let inputs = ins.iter().map(slot).collect::<Result<Vec<_>, _>>()?;
        let outputs = outs.iter().map(slot).collect::<Result<Vec<_>, _>>()?;
        for (ports, slots) in [(ins, &inputs), (outs, &outputs)] {
            for (p, s) in ports.iter().zip(slots.iter()) {
                if let Slot::Cache(c) = s {
                    if p.ty.element_type != cache_types[*c].element_type
                        || p.ty.dims() != cache_types[*c].dims()
                    {
                        return Err(format!(
                            "cache {} differs from the decode signature's",
                            p.name
                        ));
                    }
                }
            }
        }
        let port = |name: &str, ports: &[Port]| -> Result<RankedType, String> {
            ports
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.ty)
                .ok_or_else(|| format!("no {name}"))
        };
        let tokens = port("tokens", ins)?;
        let positions = port("input_pos", ins)?;
        let logits = port("logits", outs)?;
        let t = match (tokens.element_type, tokens.dims()) {
            (I32, [1, t]) if *t > 0 => *t as usize,
            _ => {
                return Err(format!(
                    "tokens: {:?} of type {}, int32 [1, T] expected",
                    tokens.dims(),
                    tokens.element_type
                ))
            }
        };
        if positions.element_type != I32 || positions.dims() != [t as i32] {
            return Err(format!(
                "input_pos: {:?}, int32 [{t}] expected",
                positions.dims()
            ));
        }
        let v = match (logits.element_type, logits.dims()) {
            (F32, [1, lt, v]) if *lt as usize == t && *v > 0 => *v as usize,
            _ => {
                return Err(format!(
                    "logits: {:?} of type {}, float32 [1, {t}, vocab] expected",
                    logits.dims(),
                    logits.element_type
                ))
            }
        };
        if vocab_size != 0 && v != vocab_size {
            return Err(format!(
                "logits: vocabulary {v}, another signature has {vocab_size}"
            ));
        }
        vocab_size = v;
        let api = &fwd.api;
        Ok(Sig {
            index,
            key: key.to_string(),
            t,
            inputs,
            outputs,
            tokens: HostBuffer::new(api, &tokens, tokens.bytes()?)?,
            positions: HostBuffer::new(api, &positions, positions.bytes()?)?,
            logits: HostBuffer::new(api, &logits, logits.bytes()?)?,
        })
    };
    let decode = make_sig(d_index, &d_key, &d_ins, &d_outs)
        .map_err(|e| load_err(path, format!("signature {d_key}: {e}")))?;
    let prefill = prefill
        .map(|(i, k, ins, outs)| {
            make_sig(i, &k, &ins, &outs).map_err(|e| load_err(path, format!("signature {k}: {e}")))
        })
        .transpose()?;
    fwd.decode = Some(decode);
    fwd.prefill = prefill;
    for set in 0..2 {
        for (ty, &bytes) in cache_types.iter().zip(&cache_bytes) {
            let b = HostBuffer::new(&fwd.api, ty, bytes).map_err(|e| load_err(path, e))?;
            fwd.caches[set].push(b);
        }
    }
    fwd.vocab = vocab_size;
    fwd.n_ctx = n_ctx.min(config.ctx_size.max(1));

    let mut stop = prompter.stop_ids().to_vec();
    stop.extend(&about.eos);
    let size_bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let info = ModelInfo {
        engine: ENGINE,
        engine_version: library_version(lib),
        library: Some(lib.to_path_buf()),
        n_ctx: fwd.n_ctx,
        n_ctx_train: n_ctx,
        n_params: None,
        size_bytes,
        n_vocab: i32::try_from(vocab_size).unwrap_or(i32::MAX),
        chat_template: prompter.has_chat_template(),
        threads: config.threads,
        delegate,
        delegate_fallback,
        slots: 1,
    };
    let vocab = HfVocab {
        prompter,
        stop,
        n_vocab: vocab_size,
        source: path.to_path_buf(),
        engine: ENGINE,
    };
    tracing::info!(
        model = %path.display(),
        prefill = fwd.prefill.as_ref().map(|s| s.key.as_str()).unwrap_or("none"),
        context = n_ctx,
        "LiteRT model ready"
    );
    Ok((vocab, fwd, info))
}

struct LiteRtForward {
    api: Api,
    env: Handle,
    model: Handle,
    compiled: Handle,
    prefill: Option<Sig>,
    decode: Option<Sig>,
    /// Two sets of cache buffers; a call reads `caches[current]` and writes the other.
    caches: [Vec<HostBuffer>; 2],
    current: usize,
    /// Tokens in the cache.
    len: usize,
    n_ctx: u32,
    vocab: usize,
    logits: Vec<f32>,
}

impl LiteRtForward {
    /// Runs one call of `sig` on `tokens` (at most its width) at the current position and
    /// keeps the logits of the last real token.
    fn call(&mut self, prefill: bool, tokens: &[i32]) -> Result<(), EngineError> {
        let LiteRtForward {
            api,
            compiled,
            prefill: p,
            decode: d,
            caches,
            current,
            len,
            vocab,
            logits,
            ..
        } = self;
        let sig = if prefill { p.as_mut() } else { d.as_mut() }
            .ok_or_else(|| decode_err("the signature is missing"))?;
        let n = tokens.len();
        debug_assert!(n >= 1 && n <= sig.t);
        for (i, chunk) in sig.tokens.bytes_mut().chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&tokens.get(i).copied().unwrap_or(0).to_le_bytes());
        }
        for (i, chunk) in sig.positions.bytes_mut().chunks_exact_mut(4).enumerate() {
            let pos = i32::try_from(*len + i).map_err(decode_err)?;
            chunk.copy_from_slice(&pos.to_le_bytes());
        }
        let (read, write) = (*current, 1 - *current);
        let mut ins: Vec<Handle> = sig
            .inputs
            .iter()
            .map(|s| match s {
                Slot::Tokens => sig.tokens.handle,
                Slot::Positions => sig.positions.handle,
                Slot::Cache(c) => caches[read][*c].handle,
                Slot::Logits => sig.logits.handle,
            })
            .collect();
        let mut outs: Vec<Handle> = sig
            .outputs
            .iter()
            .map(|s| match s {
                Slot::Cache(c) => caches[write][*c].handle,
                Slot::Logits => sig.logits.handle,
                Slot::Tokens => sig.tokens.handle,
                Slot::Positions => sig.positions.handle,
            })
            .collect();
        // SAFETY: the compiled model is live; the buffers were made for this signature's
        // tensor types and stay alive across the call; the counts match the arrays.
        let s = unsafe {
            (api.run_compiled_model)(
                *compiled,
                sig.index,
                ins.len(),
                ins.as_mut_ptr(),
                outs.len(),
                outs.as_mut_ptr(),
            )
        };
        check(&format!("LiteRtRunCompiledModel ({})", sig.key), s).map_err(decode_err)?;
        let row = (n - 1) * *vocab * 4;
        let bytes = sig
            .logits
            .bytes()
            .get(row..row + *vocab * 4)
            .ok_or_else(|| decode_err("logits shorter than the vocabulary"))?;
        logits.clear();
        logits.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        *current = write;
        *len += n;
        Ok(())
    }
}

impl Forward for LiteRtForward {
    fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    fn reset(&mut self) -> Result<(), EngineError> {
        // Positions not yet written are masked out, so the old contents never count.
        self.len = 0;
        Ok(())
    }

    fn forward(&mut self, tokens: &[i32]) -> Result<&[f32], EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if self.len + tokens.len() > self.n_ctx as usize {
            return Err(decode_err(format!(
                "{} tokens after {} exceed the model's context of {}",
                tokens.len(),
                self.len,
                self.n_ctx
            )));
        }
        let width = self.prefill.as_ref().map_or(0, |s| s.t);
        let mut rest = tokens;
        while !rest.is_empty() {
            // A prefill call writes all its width's positions, so it is used only where the
            // whole width fits the cache; the tail goes through decode one token at a time.
            if rest.len() > 1 && width > 1 && self.len + width <= self.n_ctx as usize {
                let n = rest.len().min(width);
                self.call(true, &rest[..n])?;
                rest = &rest[n..];
            } else {
                self.call(false, &rest[..1])?;
                rest = &rest[1..];
            }
        }
        Ok(&self.logits)
    }
}

impl Drop for LiteRtForward {
    fn drop(&mut self) {
        for set in &mut self.caches {
            for b in set.iter_mut() {
                b.release(&self.api);
            }
        }
        for sig in [self.prefill.as_mut(), self.decode.as_mut()]
            .into_iter()
            .flatten()
        {
            sig.tokens.release(&self.api);
            sig.positions.release(&self.api);
            sig.logits.release(&self.api);
        }
        // SAFETY: each handle is null or came from its LiteRT create call, destroyed once,
        // the compiled model before the model and the environment it uses.
        unsafe {
            if !self.compiled.is_null() {
                (self.api.destroy_compiled_model)(self.compiled);
            }
            if !self.model.is_null() {
                (self.api.destroy_model)(self.model);
            }
            if !self.env.is_null() {
                (self.api.destroy_environment)(self.env);
            }
        }
    }
}
