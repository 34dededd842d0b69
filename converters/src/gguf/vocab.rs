//! The vocabulary half of a conversion: Hugging Face tokenizer files <-> the `tokenizer.*` GGUF
//! keys llama.cpp reads (shared/facts/gguf.md §2.5).
//!
//! Forward ([`gguf_vocab_from_hf`]) reproduces what llama.cpp's converter writes for the two
//! tokenizer kinds edgepack's architectures use: byte-level BPE (`tokenizer.ggml.model = "gpt2"`,
//! `_set_vocab_gpt2` in `conversion/base.py`) and SentencePiece (`"llama"`,
//! `_set_vocab_sentencepiece`, or `_set_vocab_llama_hf` when there is no `tokenizer.model`), plus the
//! special ids, add-BOS/EOS flags and chat template that gguf-py's `SpecialVocab` finds.
//!
//! Reverse ([`hf_tokenizer_from_gguf`]) rebuilds tokenizer files that the `tokenizers` library loads
//! and that split text exactly as llama.cpp's tokenizer does for the same keys: the pre-tokenizer
//! regexes llama.cpp uses for the `pre` name, llama.cpp's special-token partitioning (every
//! control/user-defined/unknown token is matched in the raw text), its BOS/EOS rules and, for
//! SentencePiece, its score-driven merging expressed as BPE merges. For SentencePiece it also writes
//! a `tokenizer.model`, so that a GGUF -> HF -> GGUF round trip keeps the real piece scores.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::str::FromStr;

use serde_json::{json, Map, Value as Json};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::gguf::value::{Array, Metadata, Value};
use crate::model::spec::{typed, Kind};
use crate::model::tokenizer::TokenizerFiles;

// --- GGUF keys (gguf-py `constants.py` `Keys.Tokenizer`) ---------------------------------------

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
const KEY_NORMALIZER_LOWERCASE: &str = "tokenizer.ggml.normalizer.lowercase";
const KEY_NORMALIZER_STRIP_ACCENTS: &str = "tokenizer.ggml.normalizer.strip_accents";
const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";
/// Names of the extra templates, each stored under `tokenizer.chat_template.{name}`.
const KEY_CHAT_TEMPLATES: &str = "tokenizer.chat_templates";

/// The special-token kinds gguf-py's `SpecialVocab` looks for, in its order, with the GGUF key of
/// the id (`None`: gguf-py has no writer for it, so the converter drops it) and of the add flag.
/// Note the misspelled `seperator` (gguf-py and llama.cpp both spell it so).
#[rustfmt::skip]
const SPECIAL_KINDS: &[(&str, Option<&str>, Option<&str>)] = &[
    ("bos", Some("tokenizer.ggml.bos_token_id"), Some("tokenizer.ggml.add_bos_token")),
    ("eos", Some("tokenizer.ggml.eos_token_id"), Some("tokenizer.ggml.add_eos_token")),
    ("unk", Some("tokenizer.ggml.unknown_token_id"), None),
    ("sep", Some("tokenizer.ggml.seperator_token_id"), Some("tokenizer.ggml.add_sep_token")),
    ("pad", Some("tokenizer.ggml.padding_token_id"), None),
    ("cls", None, None),
    ("mask", Some("tokenizer.ggml.mask_token_id"), None),
    // Only added when a TemplateProcessing post-processor ends with a token other than EOS.
    ("eot", Some("tokenizer.ggml.eot_token_id"), None),
    ("eom", Some("tokenizer.ggml.eom_token_id"), None),
];
/// How many of [`SPECIAL_KINDS`] `SpecialVocab` looks for by default (eot/eom only on demand).
const DEFAULT_SPECIAL_KINDS: usize = 7;

fn special_kind(kind: &str) -> &'static (&'static str, Option<&'static str>, Option<&'static str>) {
    SPECIAL_KINDS
        .iter()
        .find(|k| k.0 == kind)
        .expect("kind comes from SPECIAL_KINDS")
}

// --- token types and scores (llama.h `llama_token_type` = SentencePiece piece types) ----------

const TYPE_NORMAL: i32 = 1;
const TYPE_UNKNOWN: i32 = 2;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_UNUSED: i32 = 5;
const TYPE_BYTE: i32 = 6;

/// Score of ids without a piece in `_create_vocab_sentencepiece`.
const SCORE_SPM_FILLER: f32 = -10000.0;
/// Score of added tokens in `_create_vocab_sentencepiece` and of every token in `LlamaHfVocab`.
const SCORE_ADDED: f32 = -1000.0;

/// SentencePiece's word-boundary marker U+2581, which llama.cpp's SPM tokenizer substitutes for
/// spaces (`llama_escape_whitespace`).
const SPM_SPACE: &str = "\u{2581}";

// --- pre-tokenizer detection (conversion/base.py `get_vocab_base_pre`) -------------------------

/// The probe text llama.cpp's converter encodes to fingerprint a BPE pre-tokenizer (`chktxt` in
/// `get_vocab_base_pre`; 350 code points, UTF-8 sha256 [`CHKTXT_SHA256`]).
pub const CHKTXT: &str = concat!(
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\u{1f680} (normal) \u{1f636}\u{200d}",
    "\u{1f32b}\u{fe0f} (multiple emojis concatenated) \u{2705} \u{1f999}\u{1f999} 3 33 333 33",
    "33 33333 333333 3333333 33333333 3.3 3..3 3...3 \u{1780}\u{17b6}\u{1793}\u{17cb}\u{178f}",
    "\u{17c2}\u{1796}\u{17b7}\u{179f}\u{17c1}\u{179f}\u{17a2}\u{17b6}\u{1785}\u{1f601} ?",
    "\u{6211}\u{60f3}\u{5728}apple\u{5de5}\u{4f5c}1314151\u{5929}\u{ff5e} ------======= ",
    "\u{43d}\u{435}\u{449}\u{43e} \u{43d}\u{430} \u{411}\u{44a}\u{43b}\u{433}\u{430}\u{440}",
    "\u{441}\u{43a}\u{438} ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there",
    ", 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
);

/// sha256 of [`CHKTXT`]'s UTF-8 bytes (shared/facts/gguf.md §2.5), to prove the copy is exact.
pub const CHKTXT_SHA256: &str = "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da";

/// `get_vocab_base_pre`'s table, in its order: (sha256 of the Python repr of the probe's token
/// ids, `tokenizer.ggml.pre` name, Hugging Face reference model). The Python checks every entry in
/// turn, so where a digest repeats the later name wins; [`pre_name_for_digest`] searches from the end.
#[rustfmt::skip]
const PRE_TOKENIZER_DIGESTS: &[(&str, &str, &str)] = &[
    ("b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b", "chatglm-bpe", "THUDM/glm-4-9b-chat"),
    ("81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516", "chatglm-bpe", "THUDM/glm-4-9b-chat"),
    ("a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2", "glm4", "THUDM/glm-4-9b-hf"),
    ("9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902", "glm4", "zai-org/GLM-4.5-Air"),
    ("cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267", "glm4", "zai-org/GLM-4.7-Flash"),
    ("1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35", "minerva-7b", "sapienzanlp/Minerva-7B-base-v1.0"),
    ("7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664", "hunyuan", "tencent/Hunyuan-A13B-Instruct"),
    ("bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6", "hunyuan-dense", "tencent/Hunyuan-4B-Instruct"),
    ("e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c", "hy_v4", "tencent/Hy4-preview"),
    ("a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6", "falcon-h1", "tiiuae/Falcon-H1-0.5B-Base"),
    ("60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86", "falcon-h1", "tiiuae/Falcon-H1-1B-Base"),
    ("3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896", "falcon-h1", "tiiuae/Falcon-H1-7B-Base"),
    ("48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b", "falcon-h1", "tiiuae/Falcon-H1-34B-Base"),
    ("81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890", "kimi-k2", "moonshotai/Kimi-K2-Base"),
    ("d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c", "qwen2", "Qwen/Qwen3-Embedding-0.6B"),
    ("1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f", "qwen35", "openbmb/MiniCPM-V-4_6"),
    ("66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273", "grok-2", "alvarobartt/grok-2-tokenizer"),
    ("b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df", "jina-v2-de", "aari1995/German_Semantic_V3"),
    ("0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4", "gpt-2", "evilfreelancer/ruGPT3XL"),
    ("9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7", "lfm2", "LiquidAI/LFM2.5-8B-A1B"),
    ("846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252", "gemma4", "danish-foundation-models/DFM-Mimir"),
    ("0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed", "spark2_5", "XHToken/Spark-X2.5-1.7B"),
    ("0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5", "llama-bpe", "meta-llama/Meta-Llama-3-8B"),
    ("049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754", "deepseek-llm", "deepseek-ai/deepseek-llm-7b-base"),
    ("347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821", "deepseek-coder", "deepseek-ai/deepseek-coder-6.7b-base"),
    ("8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed", "falcon", "tiiuae/falcon-7b"),
    ("0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f", "bert-bge", "BAAI/bge-small-en-v1.5"),
    ("9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e", "falcon3", "tiiuae/Falcon3-7B-Base"),
    ("8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7", "bert-bge-large", "BAAI/bge-large-zh-v1.5"),
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "mpt", "mosaicml/mpt-7b"),
    ("35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34", "starcoder", "bigcode/starcoder2-3b"),
    ("3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454", "gpt-2", "openai-community/gpt2"),
    ("32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3", "stablelm2", "stabilityai/stablelm-2-zephyr-1_6b"),
    ("6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff", "refact", "smallcloudai/Refact-1_6-base"),
    ("9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8", "command-r", "CohereForAI/c4ai-command-r-v01"),
    ("d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1", "tiny_aya", "CohereLabs/tiny-aya-base"),
    ("52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e", "cohere2moe", "CohereLabs/North-Mini-Code-1.0"),
    ("e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea", "qwen2", "Qwen/Qwen1.5-7B"),
    ("b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166", "olmo", "allenai/OLMo-1.7-7B-hf"),
    ("a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e", "dbrx", "databricks/dbrx-base"),
    ("c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448", "jina-v1-en", "jinaai/jina-reranker-v1-tiny-en"),
    ("0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f", "jina-v2-en", "jinaai/jina-embeddings-v2-base-en"),
    ("171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643", "jina-v2-es", "jinaai/jina-embeddings-v2-base-es"),
    ("27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6", "jina-v2-de", "jinaai/jina-embeddings-v2-base-de"),
    ("a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d", "jina-v5-nano", "jinaai/jina-embeddings-v5-text-nano"),
    ("c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d", "smaug-bpe", "abacusai/Smaug-Llama-3-70B-Instruct"),
    ("c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360", "poro-chat", "LumiOpen/Poro-34B-chat"),
    ("7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a", "jina-v2-code", "jinaai/jina-embeddings-v2-base-code"),
    ("7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee", "viking", "LumiOpen/Viking-7B"),
    ("b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901", "jais", "core42/jais-13b"),
    ("bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a", "jais-2", "inceptionai/Jais-2-8B-Chat"),
    ("7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f", "codeshell", "WisdomShell/CodeShell-7B"),
    ("63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e", "tekken", "mistralai/Mistral-Nemo-Base-2407"),
    ("855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249", "smollm", "HuggingFaceTB/SmolLM-135M"),
    ("3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7", "bloom", "bigscience/bloom"),
    ("bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21", "gpt3-finnish", "TurkuNLP/gpt3-finnish-small"),
    ("4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae", "exaone", "LGAI-EXAONE/EXAONE-3.0-7.8B-Instruct"),
    ("fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085", "phi-2", "microsoft/phi-2"),
    ("60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450", "chameleon", "facebook/chameleon-7b"),
    ("8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65", "roberta-bpe", "sentence-transformers/stsb-roberta-base"),
    ("ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb", "gigachat", "ai-sage/GigaChat-20B-A3B-instruct"),
    ("d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1", "megrez", "Infinigence/Megrez-3B-Instruct"),
    ("877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5", "deepseek-v3", "deepseek-ai/DeepSeek-V3"),
    ("b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5", "deepseek-r1-qwen", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
    ("ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e", "gpt-4o", "Xenova/gpt-4o"),
    ("7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f", "superbpe", "UW/OLMo2-8B-SuperBPE-t180k"),
    ("1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15", "trillion", "trillionlabs/Trillion-7B-preview"),
    ("96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224", "bailingmoe", "inclusionAI/Ling-lite"),
    ("d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406", "llama4", "meta-llama/Llama-4-Scout-17B-16E-Instruct"),
    ("0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3", "pixtral", "mistral-community/pixtral-12b"),
    ("d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec", "seed-coder", "ByteDance-Seed/Seed-Coder-8B-Base"),
    ("b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf", "a.x-4.0", "skt/A.X-4.0"),
    ("f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4", "midm-2.0", "K-intelligence/Midm-2.0-Base-Instruct"),
    ("169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51", "lfm2", "LiquidAI/LFM2.5-350M"),
    ("2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb", "exaone4", "LGAI-EXAONE/EXAONE-4.0-32B"),
    ("a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756", "mellum", "JetBrains/Mellum-4b-base"),
    ("a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152", "modern-bert", "answerdotai/ModernBERT-base"),
    ("49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df", "afmoe", "arcee-ai/Trinity-Tokenizer"),
    ("9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206", "bailingmoe2", "inclusionAI/Ling-mini-base-2.0"),
    ("53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e", "granite-docling", "ibm-granite/granite-docling-258M"),
    ("f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95", "minimax-m2", "MiniMaxAI/MiniMax-M2"),
    ("4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665", "kormo", "KORMo-Team/KORMo-tokenizer"),
    ("9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1", "youtu", "tencent/Youtu-LLM-2B"),
    ("16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91", "solar-open", "upstage/Solar-Open-100B"),
    ("6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f", "exaone-moe", "LGAI-EXAONE/K-EXAONE-236B-A23B"),
    ("d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4", "qwen35", "Qwen/Qwen3.5-9B-Instruct"),
    ("b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d", "joyai-llm", "jdopensource/JoyAI-LLM-Flash"),
    ("e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869", "kanana2", "kakaocorp/kanana-2-30b-a3b-instruct-2601"),
    ("862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015", "f2llmv2", "codefuse-ai/F2LLM-v2-4B"),
    ("62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57", "sarvam-moe", "sarvamai/sarvam-30b"),
    ("f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af", "talkie", "lewtun/talkie-1930-13b-it-hf"),
    ("36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4", "minicpm5", "openbmb/MiniCPM5-1B"),
    ("f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60", "granite-embed-multi-97m", "ibm-granite/granite-embedding-97m-multilingual-r2"),
    ("789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669", "granite-embed-multi-311m", "ibm-granite/granite-embedding-311m-multilingual-r2"),
    ("9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d", "mellum2", "JetBrains/Mellum2-12B-A2.5B-Base"),
    ("972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac", "laguna", "poolside/Laguna-XS.2"),
    ("653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd", "ufakzeka", "ufakai/ufakzeka-1"),
];

fn pre_name_for_digest(digest: &str) -> Option<&'static str> {
    PRE_TOKENIZER_DIGESTS
        .iter()
        .rev()
        .find(|(d, _, _)| *d == digest)
        .map(|(_, name, _)| *name)
}

/// Python's `str(list_of_ints)`, the text the converter hashes.
fn python_list_repr(ids: &[u32]) -> String {
    let items: Vec<String> = ids.iter().map(u32::to_string).collect();
    format!("[{}]", items.join(", "))
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Encodes [`CHKTXT`] with default special-token handling (as `tokenizer.encode(chktxt)` does, so a
/// BOS-adding post-processor counts) and returns the digest the converter looks up.
fn chktxt_digest(tokenizer: &tokenizers::Tokenizer, path: &Path) -> Result<String> {
    let enc = tokenizer.encode(CHKTXT, true).map_err(|e| {
        Error::format(
            path,
            "pre_tokenizer",
            format!("cannot encode the probe text: {e}"),
        )
    })?;
    Ok(sha256_hex(python_list_repr(enc.get_ids()).as_bytes()))
}

// --- pre-tokenizers llama.cpp applies (src/llama-vocab.cpp, `llm_tokenizer_bpe`) ----------------

// The regexes below are llama.cpp's, applied one after another (each splits the pieces of the
// previous one, keeping unmatched text as pieces): the HF equivalent is a Sequence of
// Split(behavior = Isolated) followed by a regex-less ByteLevel.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RES_DEFAULT: &[&str] = &[
    r"[\p{P}\$\+<=>\^~\|]+",
    RE_GPT2,
    r"\p{N}+",
    "[0-9][0-9][0-9]",
];
const RES_FALCON: &[&str] = &[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, "[0-9][0-9][0-9]"];
const RES_SMOLLM: &[&str] = &[r"\p{N}", RE_GPT2];

/// What a `tokenizer.ggml.pre` name means to llama.cpp's BPE tokenizer.
struct PreTokenizer {
    regexes: &'static [&'static str],
    /// A whole pre-token that is in the vocabulary is emitted without merging.
    ignore_merges: bool,
    /// Default of `add_bos` when `tokenizer.ggml.add_bos_token` is absent.
    add_bos: bool,
}

/// The pre names edgepack can express as HF pre-tokenizers, grouped as `llama_vocab::impl::load`
/// groups them. Names with extra behaviour HF cannot express here (BOS disabled, SEP added, token
/// attributes, custom splitters) are left out on purpose.
fn pre_tokenizer(pre: &str) -> Option<PreTokenizer> {
    let (regexes, ignore_merges, add_bos): (&'static [&'static str], bool, bool) = match pre {
        "default" => (RES_DEFAULT, false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => (&[RE_LLAMA3], true, true),
        "dbrx" | "smaug-bpe" => (&[RE_LLAMA3], false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" => (&[RE_QWEN2], false, false),
        "qwen35" => (&[RE_QWEN35], false, false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => (RES_SMOLLM, false, false),
        "gpt-2" | "phi-2" | "gigachat" | "a.x-4.0" | "mellum" | "mpt" | "olmo" | "jais"
        | "trillion" | "granite-docling" | "exaone4" => (&[RE_GPT2], false, false),
        "falcon" => (RES_FALCON, false, false),
        "tekken" => (&[RE_TEKKEN], true, true),
        _ => return None,
    };
    Some(PreTokenizer {
        regexes,
        ignore_merges,
        add_bos,
    })
}

// =============================================================================================
// Forward: HF files -> GGUF keys
// =============================================================================================

/// HF tokenizer files -> the `tokenizer.*` GGUF keys llama.cpp needs, exactly as llama.cpp's
/// converter writes them (types matter: UINT32 ids, BOOL flags, ARRAY[STRING] tokens, ARRAY[FLOAT32] scores,
/// ARRAY[INT32] token_type, ARRAY[STRING] merges, STRING chat_template).
/// `config` is config.json (for vocab_size, bos/eos fallbacks), `vocab_size` = rows of the embedding,
/// `src` = the model folder (for error messages).
///
/// The token list always has `vocab_size` entries (llama.cpp checks it against the embedding);
/// config.json's `vocab_size` is not consulted for that. Choice of path follows `LlamaModel.set_vocab`:
/// `tokenizer.model` -> SentencePiece; else a SentencePiece-style `tokenizer.json` (BPE with
/// byte_fallback and a Sequence decoder) -> `LlamaHfVocab`; else byte-level BPE.
pub fn gguf_vocab_from_hf(
    tok: &TokenizerFiles,
    config: &serde_json::Value,
    vocab_size: usize,
    src: &Path,
) -> Result<Metadata> {
    build_gguf_vocab(tok, config, vocab_size, src, None)
}

/// The tokens part of a vocabulary, before `SpecialVocab`'s keys.
struct BaseVocab {
    model: &'static str,
    pre: String,
    tokens: Vec<String>,
    scores: Option<Vec<f32>>,
    types: Vec<i32>,
    /// Byte-level BPE also carries merges (`SpecialVocab(load_merges=True)`).
    load_merges: bool,
}

/// [`gguf_vocab_from_hf`] with an optional fixed pre name instead of the probe-text digest lookup
/// (the unit tests' tiny vocabularies have no entry in llama.cpp's table).
fn build_gguf_vocab(
    tok: &TokenizerFiles,
    config: &Json,
    vocab_size: usize,
    src: &Path,
    fixed_pre: Option<&str>,
) -> Result<Metadata> {
    let tc_path = src.join("tokenizer_config.json");
    let tc = match &tok.tokenizer_config {
        Some(Json::Object(m)) => Some(m),
        Some(_) => {
            return Err(Error::format(
                &tc_path,
                "tokenizer_config.json",
                "not a JSON object",
            ))
        }
        None => None,
    };
    let tj_path = src.join("tokenizer.json");
    let tj: Option<Json> = match &tok.tokenizer_json {
        Some(text) => Some(serde_json::from_str(text).map_err(|e| {
            Error::format(&tj_path, "tokenizer.json", format!("invalid JSON: {e}"))
        })?),
        None => None,
    };
    if vocab_size == 0 {
        return Err(Error::format(
            src,
            "vocab_size",
            "the embedding has no rows",
        ));
    }

    let mut meta = Metadata::new();
    // `LlamaModel.set_vocab` copies this before anything else.
    if let Some(b) = json_flag(
        tc.and_then(|c| c.get("add_prefix_space")),
        &src.join("tokenizer_config.json"),
        "add_prefix_space",
    )? {
        meta.set(KEY_ADD_SPACE_PREFIX, Value::Bool(b));
    }

    let base = if let Some(model) = &tok.sentencepiece_model {
        spm_vocab(model, tc, vocab_size, src)?
    } else {
        let (Some(text), Some(tj)) = (&tok.tokenizer_json, &tj) else {
            return Err(Error::format(
                src,
                "tokenizer",
                "no tokenizer.json or tokenizer.model: cannot build the vocabulary",
            ));
        };
        let model = tj.get("model").unwrap_or(&Json::Null);
        let model_type = model.get("type").and_then(Json::as_str).unwrap_or("");
        if model_type != "BPE" {
            return Err(Error::unsupported(
                &tj_path,
                "model.type",
                format!("{model_type:?}: only BPE tokenizers (byte-level or SentencePiece-style) are supported"),
            ));
        }
        // `LlamaHfVocab`'s test: Llama 3 style (ignore_merges without byte_fallback) is byte-level;
        // byte_fallback with a Sequence decoder is a converted SentencePiece tokenizer.
        let flag = |k: &str| json_flag(model.get(k), &tj_path, &format!("model.{k}"));
        let (ignore_merges, byte_fallback) = (flag("ignore_merges")?, flag("byte_fallback")?);
        // (an absent byte_fallback counts as true there, as in the converter's test)
        let is_llama3 = ignore_merges == Some(true) && byte_fallback == Some(false);
        let decoder_is_sequence =
            tj.pointer("/decoder/type").and_then(Json::as_str) == Some("Sequence");
        if !is_llama3 && byte_fallback == Some(true) && decoder_is_sequence {
            llama_hf_vocab(text, vocab_size, &tj_path)?
        } else {
            bpe_vocab(text, vocab_size, &tj_path, fixed_pre)?
        }
    };

    // llama.cpp asserts token strings are unique; an added token that repeats a piece (or a
    // user-defined token whose U+2581 became a space) would only fail there, at load time.
    let mut first_id: HashMap<&str, usize> = HashMap::with_capacity(base.tokens.len());
    for (id, t) in base.tokens.iter().enumerate() {
        if let Some(prev) = first_id.insert(t.as_str(), id) {
            return Err(Error::format(
                src,
                KEY_TOKENS,
                format!("token {t:?} appears at ids {prev} and {id}; llama.cpp needs unique token strings"),
            ));
        }
    }
    drop(first_id);

    meta.set(KEY_MODEL, Value::String(base.model.to_owned()));
    meta.set(KEY_PRE, Value::String(base.pre.clone()));
    let n_tokens = base.tokens.len();
    meta.set(KEY_TOKENS, Value::Array(Array::String(base.tokens)));
    if let Some(scores) = base.scores {
        meta.set(KEY_SCORES, Value::Array(Array::F32(scores)));
    }
    meta.set(KEY_TOKEN_TYPE, Value::Array(Array::I32(base.types)));

    let special = SpecialVocab::load(tj.as_ref(), tc, config, base.load_merges, n_tokens, src)?;
    special.write(&mut meta);
    Ok(meta)
}

fn load_tokenizer(text: &str, path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_str(text).map_err(|e| {
        Error::format(
            path,
            "tokenizer.json",
            format!("the tokenizers library cannot load it: {e}"),
        )
    })
}

/// `does_token_look_special` in conversion/base.py: added tokens some models forget to mark special.
fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<\u{ff5c}") && token.ends_with("\u{ff5c}>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// Token strings by id from a vocabulary map, checking every id fits the embedding.
fn tokens_by_id(
    vocab: HashMap<String, u32>,
    vocab_size: usize,
    path: &Path,
) -> Result<Vec<Option<String>>> {
    let mut by_id: Vec<Option<String>> = vec![None; vocab_size];
    for (token, id) in vocab {
        let slot = by_id.get_mut(id as usize).ok_or_else(|| {
            Error::mismatch(
                path,
                "model.vocab",
                format!(
                    "token {token:?} has id {id}, beyond the {vocab_size} rows of the embedding"
                ),
            )
        })?;
        *slot = Some(token);
    }
    Ok(by_id)
}

/// Byte-level BPE tokens and types (`get_vocab_base`).
fn bpe_vocab(
    text: &str,
    vocab_size: usize,
    path: &Path,
    fixed_pre: Option<&str>,
) -> Result<BaseVocab> {
    let tokenizer = load_tokenizer(text, path)?;
    let pre = match fixed_pre {
        Some(p) => p.to_owned(),
        None => {
            let digest = chktxt_digest(&tokenizer, path)?;
            pre_name_for_digest(&digest).map(str::to_owned).ok_or_else(|| {
                Error::unsupported(
                    path,
                    "pre_tokenizer",
                    format!(
                        "BPE pre-tokenizer not recognized: the probe-text token ids hash to {digest}, \
                         which is not in llama.cpp's get_vocab_base_pre table. llama.cpp would not know how \
                         to split text for this model; if it pre-tokenizes exactly like a known model, add \
                         the digest with that name to PRE_TOKENIZER_DIGESTS"
                    ),
                )
            })?
        }
    };
    let added = tokenizer.get_added_tokens_decoder();
    let by_id = tokens_by_id(tokenizer.get_vocab(true), vocab_size, path)?;
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for (id, token) in by_id.into_iter().enumerate() {
        let Some(token) = token else {
            tokens.push(format!("[PAD{id}]"));
            types.push(TYPE_UNUSED);
            continue;
        };
        // The converter also re-normalizes non-normalized added tokens through an encode/decode
        // round trip; for byte-level tokenizers that returns the token unchanged, so it is skipped.
        match added.get(&(id as u32)) {
            Some(at) if at.special || looks_special(&token) => {
                tokens.push(token);
                types.push(TYPE_CONTROL);
            }
            Some(_) => {
                // llama.cpp matches user-defined tokens in raw text, so SentencePiece-style
                // spaces are turned back into real ones.
                tokens.push(token.replace(SPM_SPACE, " "));
                types.push(TYPE_USER_DEFINED);
            }
            None => {
                tokens.push(token);
                types.push(TYPE_NORMAL);
            }
        }
    }
    Ok(BaseVocab {
        model: "gpt2",
        pre,
        tokens,
        scores: None,
        types,
        load_merges: true,
    })
}

/// `LlamaHfVocab`: a SentencePiece vocabulary known only from a converted tokenizer.json. Every
/// score is -1000 (the converter has no real scores), which makes llama.cpp merge left to right.
fn llama_hf_vocab(text: &str, vocab_size: usize, path: &Path) -> Result<BaseVocab> {
    let tokenizer = load_tokenizer(text, path)?;
    let base_size = tokenizer.get_vocab_size(false);
    let added = tokenizer.get_added_tokens_decoder();
    // transformers' `all_special_ids`, approximated by the added tokens marked special.
    let special_ids: HashSet<u32> = added
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| *id)
        .collect();
    let by_id = tokens_by_id(tokenizer.get_vocab(true), vocab_size, path)?;
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for (id, token) in by_id.into_iter().enumerate() {
        let Some(token) = token else {
            // LlamaHfVocab does not pad; llama.cpp needs one token per embedding row.
            tokens.push(format!("[PAD{id}]"));
            types.push(TYPE_UNUSED);
            continue;
        };
        let special = special_ids.contains(&(id as u32));
        let ty = if id >= base_size {
            if special {
                TYPE_CONTROL
            } else {
                TYPE_USER_DEFINED
            }
        } else if is_byte_token(&token) {
            TYPE_BYTE
        } else if special {
            TYPE_CONTROL
        } else {
            TYPE_NORMAL
        };
        tokens.push(token);
        types.push(ty);
    }
    let scores = vec![SCORE_ADDED; vocab_size];
    Ok(BaseVocab {
        model: "llama",
        pre: "default".to_owned(),
        tokens,
        scores: Some(scores),
        types,
        load_merges: false,
    })
}

/// `<0xAB>`: SentencePiece's byte-fallback pieces.
fn is_byte_token(token: &str) -> bool {
    let b = token.as_bytes();
    b.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && b[3].is_ascii_hexdigit()
        && b[4].is_ascii_hexdigit()
}

/// `_create_vocab_sentencepiece`: pieces from tokenizer.model, then tokenizer_config.json's
/// `added_tokens_decoder` on top.
fn spm_vocab(
    model: &[u8],
    tc: Option<&Map<String, Json>>,
    vocab_size: usize,
    src: &Path,
) -> Result<BaseVocab> {
    let pieces = parse_sentencepiece(model, &src.join("tokenizer.model"))?;
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![SCORE_SPM_FILLER; vocab_size];
    let mut types = vec![TYPE_UNUSED; vocab_size];
    // Pieces beyond the embedding are dropped, as the converter does (with a warning).
    for (i, p) in pieces.into_iter().enumerate().take(vocab_size) {
        // The converter asks SentencePiece IsUnknown/IsControl/IsUnused/IsByte; anything else,
        // user-defined pieces included, becomes NORMAL.
        types[i] = match p.kind {
            SP_UNKNOWN => TYPE_UNKNOWN,
            SP_CONTROL => TYPE_CONTROL,
            SP_UNUSED => TYPE_UNUSED,
            SP_BYTE => TYPE_BYTE,
            _ => TYPE_NORMAL,
        };
        tokens[i] = p.piece;
        scores[i] = p.score;
    }
    let tc_path = src.join("tokenizer_config.json");
    if let Some(decoder) = tc.and_then(|c| c.get("added_tokens_decoder")) {
        let Some(decoder) = decoder.as_object() else {
            return Err(Error::format(
                &tc_path,
                "added_tokens_decoder",
                "not a JSON object",
            ));
        };
        for (key, data) in decoder {
            let id: usize = key.parse().map_err(|_| {
                Error::format(
                    &tc_path,
                    format!("added_tokens_decoder.{key}"),
                    "key is not a token id",
                )
            })?;
            let content = data.get("content").and_then(Json::as_str).ok_or_else(|| {
                Error::format(
                    &tc_path,
                    format!("added_tokens_decoder.{key}.content"),
                    "missing or not a string",
                )
            })?;
            if id >= vocab_size {
                continue;
            }
            let special = json_flag(
                data.get("special"),
                &tc_path,
                &format!("added_tokens_decoder.{key}.special"),
            )?
            .unwrap_or(false);
            if special || looks_special(content) {
                types[id] = TYPE_CONTROL;
                tokens[id] = content.to_owned();
            } else {
                types[id] = TYPE_USER_DEFINED;
                tokens[id] = content.replace(SPM_SPACE, " ");
            }
            scores[id] = SCORE_ADDED;
        }
    }
    Ok(BaseVocab {
        model: "llama",
        pre: "default".to_owned(),
        tokens,
        scores: Some(scores),
        types,
        load_merges: false,
    })
}

/// gguf-py's `SpecialVocab`: merges, special ids, add flags, chat template, normalizer flags.
#[derive(Default)]
struct SpecialVocab {
    merges: Vec<String>,
    /// (kind, id) in the order found; the first find of a kind wins.
    ids: Vec<(&'static str, u32)>,
    /// (kind, add it?) in the order found.
    add: Vec<(&'static str, bool)>,
    chat_template: Option<Json>,
    lowercase: Option<bool>,
    strip_accents: Option<bool>,
}

/// A token named in tokenizer_config.json: a plain string or an AddedToken-like `{content}` object.
/// (gguf-py compares the raw value in its post-processor checks, where an object never equals a
/// token name and it falls back on treating the token as CLS; comparing contents gives the same
/// keys without that detour.)
fn token_content(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) if !s.is_empty() => Some(s.clone()),
        Json::Object(o) => o
            .get("content")
            .and_then(Json::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        _ => None,
    }
}

fn template_special(item: Option<&Json>) -> Option<String> {
    item?
        .pointer("/SpecialToken/id")
        .and_then(Json::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn template_sequence(item: Option<&Json>) -> Option<String> {
    item?
        .pointer("/Sequence/id")
        .and_then(Json::as_str)
        .map(str::to_owned)
}

/// A true/false field of a tokenizer file: absent or null is `None`. Anything else is refused
/// by file and field: Python's converter would take the string "false" as true, and a default
/// would hide the mistake.
fn json_flag(v: Option<&Json>, file: &Path, field: &str) -> Result<Option<bool>> {
    Ok(typed(v, Kind::Bool, file, field)?.and_then(Json::as_bool))
}

impl SpecialVocab {
    fn load(
        tj: Option<&Json>,
        tc: Option<&Map<String, Json>>,
        config: &Json,
        load_merges: bool,
        n_vocab: usize,
        src: &Path,
    ) -> Result<SpecialVocab> {
        let mut sv = SpecialVocab::default();
        let mut kinds: Vec<&'static str> = SPECIAL_KINDS[..DEFAULT_SPECIAL_KINDS]
            .iter()
            .map(|k| k.0)
            .collect();
        let tj_path = src.join("tokenizer.json");
        // gguf-py edits its copy of tokenizer_config.json while reading the post-processor.
        let mut tc: Option<Map<String, Json>> = tc.filter(|m| !m.is_empty()).cloned();
        let mut added_tokens: &[Json] = &[];

        if let Some(tj) = tj {
            if load_merges {
                sv.merges = hf_merges(tj.pointer("/model/merges"), &tj_path)?;
                if sv.merges.is_empty() {
                    // The converter only warns, but llama.cpp refuses a gpt2 vocabulary without merges.
                    return Err(Error::format(
                        &tj_path,
                        "model.merges",
                        "byte-level BPE needs merges; none found",
                    ));
                }
            }
            if let Some(n) = tj.get("normalizer").filter(|n| !n.is_null()) {
                sv.parse_normalizer(n, &tj_path, "normalizer")?;
            }
            added_tokens = tj
                .get("added_tokens")
                .and_then(Json::as_array)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            sv.read_post_processor(tj, &mut tc, &mut kinds);
        }

        if let Some(tc) = &tc {
            sv.chat_template = match tc.get("chat_template") {
                Some(t @ (Json::String(_) | Json::Array(_))) => Some(t.clone()),
                _ => None,
            };
            for &kind in &kinds {
                let key = format!("add_{kind}_token");
                if let Some(b) = json_flag(tc.get(&key), &src.join("tokenizer_config.json"), &key)?
                {
                    // The post-processor's opinion wins over tokenizer_config.json's.
                    if !sv.add.iter().any(|(k, _)| *k == kind) {
                        sv.add.push((kind, b));
                    }
                }
                let Some(content) = token_content(tc.get(&format!("{kind}_token"))) else {
                    continue;
                };
                let id = added_tokens
                    .iter()
                    .find(|t| t.get("content").and_then(Json::as_str) == Some(content.as_str()))
                    .and_then(|t| t.get("id"))
                    .and_then(Json::as_i64);
                sv.set_id(kind, id, n_vocab);
            }
        }

        // config.json fills what the tokenizer files did not name (also text_config for VLMs).
        for &kind in &kinds {
            let field = format!("{kind}_token_id");
            let v = match config.get(&field) {
                Some(v) => Some(v),
                None => config.get("text_config").and_then(|t| t.get(&field)),
            };
            sv.set_id(kind, v.and_then(Json::as_i64), n_vocab);
        }
        Ok(sv)
    }

    /// `_set_special_token`: integer ids only, first one wins, ids outside the vocabulary dropped.
    /// (gguf-py raises on negative ids; they cannot be stored as UINT32, so they are dropped too.)
    fn set_id(&mut self, kind: &'static str, id: Option<i64>, n_vocab: usize) {
        let Some(id) = id else { return };
        if id < 0 || id as u64 >= n_vocab as u64 || self.ids.iter().any(|(k, _)| *k == kind) {
            return;
        }
        self.ids.push((kind, id as u32));
    }

    fn set_add_default(&mut self, kind: &'static str, value: bool) {
        if !self.add.iter().any(|(k, _)| *k == kind) {
            self.add.push((kind, value));
        }
    }

    fn set_add(&mut self, kind: &'static str, value: bool) {
        match self.add.iter_mut().find(|(k, _)| *k == kind) {
            Some(slot) => slot.1 = value,
            None => self.add.push((kind, value)),
        }
    }

    /// The normalizer at `field` of tokenizer.json (`path`).
    fn parse_normalizer(&mut self, n: &Json, path: &Path, field: &str) -> Result<()> {
        match n.get("type").and_then(Json::as_str) {
            Some("Lowercase") => self.lowercase = Some(true),
            Some("StripAccents") => self.strip_accents = Some(true),
            Some("BertNormalizer") => {
                let flag = |k: &str| json_flag(n.get(k), path, &format!("{field}.{k}"));
                if let Some(b) = flag("lowercase")? {
                    self.lowercase = Some(b);
                }
                if let Some(b) = flag("strip_accents")? {
                    self.strip_accents = Some(b);
                }
            }
            Some("Sequence") => {
                let inner = n.get("normalizers").and_then(Json::as_array);
                for (i, inner) in inner.into_iter().flatten().enumerate() {
                    self.parse_normalizer(inner, path, &format!("{field}.normalizers[{i}]"))?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// gguf-py's reading of tokenizer.json's post-processor: ByteLevel means no BOS/EOS,
    /// RobertaProcessing adds both, and a TemplateProcessing is read crudely from its ends.
    fn read_post_processor(
        &mut self,
        tj: &Json,
        tc: &mut Option<Map<String, Json>>,
        kinds: &mut Vec<&'static str>,
    ) {
        let get = |tc: &Option<Map<String, Json>>, k: &str| {
            tc.as_ref().and_then(|m| token_content(m.get(k)))
        };
        let mut bos = get(tc, "bos_token");
        let mut cls = get(tc, "cls_token");
        let mut eos = get(tc, "eos_token");
        let mut sep = get(tc, "sep_token");
        if let Some(m) = tc.as_mut() {
            if bos.is_none() && cls.is_some() {
                bos.clone_from(&cls);
                m.insert("bos_token".into(), json!(bos));
            }
            if eos.is_none() && sep.is_some() {
                eos.clone_from(&sep);
                m.insert("eos_token".into(), json!(eos));
            }
        }
        let Some(pp) = tj.get("post_processor").filter(|p| p.is_object()) else {
            return;
        };
        let processors: Vec<&Json> = match pp.get("processors").and_then(Json::as_array) {
            Some(list) => list.iter().collect(),
            None => vec![pp],
        };
        for p in processors {
            match p.get("type").and_then(Json::as_str) {
                Some("ByteLevel") => {
                    self.set_add_default("bos", false);
                    self.set_add_default("eos", false);
                }
                Some("RobertaProcessing") => {
                    self.set_add("bos", true);
                    self.set_add("eos", true);
                    self.set_add("sep", true);
                    if let Some(m) = tc.as_mut() {
                        if cls.is_none() {
                            cls = p
                                .pointer("/cls/0")
                                .and_then(Json::as_str)
                                .map(str::to_owned)
                                .or_else(|| bos.clone());
                            m.insert("cls_token".into(), json!(cls));
                        }
                        if sep.is_none() {
                            sep = p
                                .pointer("/sep/0")
                                .and_then(Json::as_str)
                                .map(str::to_owned)
                                .or_else(|| eos.clone());
                            m.insert("sep_token".into(), json!(sep));
                        }
                    }
                }
                Some("TemplateProcessing") => {
                    let empty = Vec::new();
                    let single = p.get("single").and_then(Json::as_array).unwrap_or(&empty);
                    let pair = p.get("pair").and_then(Json::as_array).unwrap_or(&empty);
                    let mut first = None;
                    let mut last = None;
                    if single.len() > 1 {
                        first = template_special(single.first());
                        if let Some(f) = &first {
                            match tc.as_mut() {
                                None => bos = Some(f.clone()),
                                Some(m) if Some(f) != bos.as_ref() && Some(f) != cls.as_ref() => {
                                    if bos.is_none() {
                                        bos = Some(f.clone());
                                        m.insert("bos_token".into(), json!(f));
                                    }
                                    if cls.is_none() {
                                        cls = Some(f.clone());
                                        m.insert("cls_token".into(), json!(f));
                                    }
                                }
                                Some(_) => {}
                            }
                            let is_bos = Some(f) == bos.as_ref() || Some(f) == cls.as_ref();
                            self.set_add("bos", is_bos);
                        }
                        last = template_special(single.last());
                        if let Some(l) = &last {
                            match tc.as_mut() {
                                None => eos = Some(l.clone()),
                                Some(m) if Some(l) != eos.as_ref() => {
                                    // The old EOS becomes EOT (or EOM), the trailing token the new EOS.
                                    if !kinds.contains(&"eot") {
                                        kinds.push("eot");
                                        m.insert("eot_token".into(), json!(eos));
                                    } else if !kinds.contains(&"eom") {
                                        kinds.push("eom");
                                        m.insert("eom_token".into(), json!(eos));
                                    }
                                    eos = Some(l.clone());
                                    m.insert("eos_token".into(), json!(l));
                                }
                                Some(_) => {}
                            }
                            self.set_add("eos", Some(l) == eos.as_ref());
                        }
                    }
                    if !pair.is_empty() {
                        let start =
                            usize::from(first.is_some() && template_special(pair.first()) == first);
                        let stop_trim =
                            usize::from(last.is_some() && template_special(pair.last()) == last);
                        let inner: &[Json] = if pair.len() >= start + stop_trim {
                            &pair[start..pair.len() - stop_trim]
                        } else {
                            &[]
                        };
                        if !inner.is_empty()
                            && template_sequence(inner.first()).as_deref() == Some("A")
                            && template_sequence(inner.last()).as_deref() == Some("B")
                            && inner.len() > 2
                        {
                            // "A [sep] [eos] B": what sits between the two sequences.
                            let middle = &inner[1..inner.len() - 1];
                            let is_sep =
                                |t: &Option<String>| t.is_some() && (*t == sep || *t == eos);
                            let mut add_sep = false;
                            let m0 = template_special(middle.first());
                            if is_sep(&m0) && last.is_none() {
                                add_sep = true;
                            }
                            if middle.len() == 2 && is_sep(&template_special(middle.get(1))) {
                                add_sep = true;
                            }
                            self.set_add("sep", add_sep);
                            if add_sep && sep.is_none() {
                                if let Some(m) = tc.as_mut() {
                                    m.insert("sep_token".into(), json!(eos));
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn write(&self, meta: &mut Metadata) {
        if !self.merges.is_empty() {
            meta.set(KEY_MERGES, Value::Array(Array::String(self.merges.clone())));
        }
        for &(kind, id) in &self.ids {
            if let Some(key) = special_kind(kind).1 {
                meta.set(key, Value::U32(id));
            }
        }
        for &(kind, add) in &self.add {
            if let Some(key) = special_kind(kind).2 {
                meta.set(key, Value::Bool(add));
            }
        }
        match &self.chat_template {
            Some(Json::String(t)) => meta.set(KEY_CHAT_TEMPLATE, Value::String(t.clone())),
            Some(Json::Array(list)) => write_chat_template_list(list, meta),
            _ => {}
        }
        if let Some(b) = self.lowercase {
            meta.set(KEY_NORMALIZER_LOWERCASE, Value::Bool(b));
        }
        if let Some(b) = self.strip_accents {
            meta.set(KEY_NORMALIZER_STRIP_ACCENTS, Value::Bool(b));
        }
    }
}

/// gguf-py `add_chat_template` for a list of `{name, template}`: the "default" one becomes
/// `tokenizer.chat_template`, the others `tokenizer.chat_template.{name}` (name reduced to
/// `[A-Za-z0-9_]`) listed in `tokenizer.chat_templates`.
fn write_chat_template_list(list: &[Json], meta: &mut Metadata) {
    let mut default = None;
    let mut names: Vec<String> = Vec::new();
    for choice in list {
        let name: String = choice
            .get("name")
            .and_then(Json::as_str)
            .unwrap_or("")
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let Some(template) = choice.get("template").and_then(Json::as_str) else {
            continue;
        };
        if name.is_empty() {
            continue;
        }
        if name == "default" {
            default = Some(template.to_owned());
        } else {
            meta.set(
                format!("{KEY_CHAT_TEMPLATE}.{name}"),
                Value::String(template.to_owned()),
            );
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    if !names.is_empty() {
        meta.set(KEY_CHAT_TEMPLATES, Value::Array(Array::String(names)));
    }
    if let Some(t) = default {
        meta.set(KEY_CHAT_TEMPLATE, Value::String(t));
    }
}

/// tokenizer.json `model.merges` as GGUF merges: "a b" strings are kept, `[a, b]` pairs (the format
/// since transformers 4.45, which allows spaces inside a side) are joined with a space after
/// writing each inner space as U+0120, as gguf-py does.
fn hf_merges(merges: Option<&Json>, path: &Path) -> Result<Vec<String>> {
    let Some(list) = merges.and_then(Json::as_array) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        match m {
            Json::String(s) => out.push(s.clone()),
            Json::Array(pair) if pair.len() == 2 && pair.iter().all(Json::is_string) => {
                let side = |j: &Json| j.as_str().unwrap_or_default().replace(' ', "\u{120}");
                out.push(format!("{} {}", side(&pair[0]), side(&pair[1])));
            }
            _ => {
                return Err(Error::format(
                    path,
                    format!("model.merges[{i}]"),
                    "neither an \"a b\" string nor an [a, b] pair",
                ))
            }
        }
    }
    Ok(out)
}

// --- SentencePiece protobuf (sentencepiece_model.proto) --------------------------------------

// ModelProto.SentencePiece.Type values (USER_DEFINED = 4 needs no name: the converter makes it NORMAL).
const SP_NORMAL: i32 = 1;
const SP_UNKNOWN: i32 = 2;
const SP_CONTROL: i32 = 3;
const SP_UNUSED: i32 = 5;
const SP_BYTE: i32 = 6;

// Field numbers used here: ModelProto{pieces=1, trainer_spec=2, normalizer_spec=3},
// SentencePiece{piece=1, score=2, type=3}, TrainerSpec{model_type=3, vocab_size=4,
// byte_fallback=35, unk_piece=45, bos_piece=46, eos_piece=47, pad_piece=48},
// NormalizerSpec{name=1, add_dummy_prefix=3, remove_extra_whitespaces=4, escape_whitespaces=5}.
const TRAINER_MODEL_TYPE_BPE: u64 = 2;

#[derive(Debug)]
struct SpPiece {
    piece: String,
    score: f32,
    kind: i32,
}

enum Wire<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Minimal protobuf wire-format reader: enough to walk messages and skip unknown fields.
struct ProtoReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> ProtoReader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        ProtoReader { buf, pos: 0 }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos)?;
            self.pos += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(value);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len())?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Some(s)
    }

    /// The next (field number, value), `Ok(None)` at the end, `Err` on malformed input.
    fn field(&mut self) -> std::result::Result<Option<(u64, Wire<'a>)>, &'static str> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint().ok_or("truncated field key")?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint().ok_or("truncated varint")?),
            1 => {
                self.take(8).ok_or("truncated fixed64")?;
                Wire::Fixed64
            }
            2 => {
                let len = self.varint().ok_or("truncated length")?;
                let len = usize::try_from(len).map_err(|_| "length too large")?;
                Wire::Bytes(
                    self.take(len)
                        .ok_or("length-delimited field runs past the end")?,
                )
            }
            5 => {
                let b = self.take(4).ok_or("truncated fixed32")?;
                Wire::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            _ => return Err("unsupported wire type (groups are not used by SentencePiece)"),
        };
        Ok(Some((key >> 3, wire)))
    }
}

/// The pieces of a `tokenizer.model` (ModelProto.pieces), in id order.
fn parse_sentencepiece(bytes: &[u8], path: &Path) -> Result<Vec<SpPiece>> {
    let mut pieces = Vec::new();
    let mut r = ProtoReader::new(bytes);
    while let Some((field, wire)) = r
        .field()
        .map_err(|m| Error::format(path, "ModelProto", m))?
    {
        let (1, Wire::Bytes(msg)) = (field, wire) else {
            continue;
        };
        let at = || format!("pieces[{}]", pieces.len());
        let mut piece = SpPiece {
            piece: String::new(),
            score: 0.0,
            kind: SP_NORMAL,
        };
        let mut pr = ProtoReader::new(msg);
        while let Some((f, w)) = pr.field().map_err(|m| Error::format(path, at(), m))? {
            match (f, w) {
                (1, Wire::Bytes(s)) => {
                    piece.piece = String::from_utf8(s.to_vec())
                        .map_err(|_| Error::format(path, format!("{}.piece", at()), "not UTF-8"))?;
                }
                (2, Wire::Fixed32(bits)) => piece.score = f32::from_bits(bits),
                (3, Wire::Varint(v)) => piece.kind = v as i32,
                (1..=3, _) => {
                    return Err(Error::format(
                        path,
                        at(),
                        format!("field {f} has the wrong wire type"),
                    ))
                }
                _ => {}
            }
        }
        pieces.push(piece);
    }
    if pieces.is_empty() {
        return Err(Error::format(
            path,
            "pieces",
            "no pieces: not a SentencePiece model",
        ));
    }
    Ok(pieces)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, (field << 3) | wire);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_uint(out: &mut Vec<u8>, field: u64, v: u64) {
    put_key(out, field, 0);
    put_varint(out, v);
}

/// Named pieces written into the TrainerSpec so SentencePiece's bos_id()/eos_id()/... find them.
struct SpNames<'a> {
    unk: Option<&'a str>,
    bos: Option<&'a str>,
    eos: Option<&'a str>,
    pad: Option<&'a str>,
}

/// A BPE `tokenizer.model` holding the GGUF pieces, scores and types, with llama.cpp's text
/// handling as normalizer (no normalization rules, spaces escaped, dummy prefix as configured,
/// whitespace runs kept).
fn write_sentencepiece(pieces: &[SpPiece], names: &SpNames, add_dummy_prefix: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut has_bytes = false;
    for p in pieces {
        let mut m = Vec::with_capacity(p.piece.len() + 12);
        put_bytes(&mut m, 1, p.piece.as_bytes());
        put_key(&mut m, 2, 5);
        m.extend_from_slice(&p.score.to_le_bytes());
        put_uint(&mut m, 3, p.kind as u64);
        put_bytes(&mut out, 1, &m);
        has_bytes |= p.kind == SP_BYTE;
    }
    let mut trainer = Vec::new();
    put_uint(&mut trainer, 3, TRAINER_MODEL_TYPE_BPE);
    put_uint(&mut trainer, 4, pieces.len() as u64);
    // SentencePiece rejects byte pieces unless byte_fallback is set.
    put_uint(&mut trainer, 35, u64::from(has_bytes));
    for (field, name) in [
        (45, names.unk),
        (46, names.bos),
        (47, names.eos),
        (48, names.pad),
    ] {
        if let Some(n) = name {
            put_bytes(&mut trainer, field, n.as_bytes());
        }
    }
    put_bytes(&mut out, 2, &trainer);
    let mut norm = Vec::new();
    put_bytes(&mut norm, 1, b"identity");
    put_uint(&mut norm, 3, u64::from(add_dummy_prefix));
    put_uint(&mut norm, 4, 0);
    put_uint(&mut norm, 5, 1);
    put_bytes(&mut out, 3, &norm);
    out
}

// =============================================================================================
// Reverse: GGUF keys -> HF files
// =============================================================================================

/// The reverse: `tokenizer.*` GGUF keys -> HF tokenizer files (tokenizer.json, tokenizer_config.json with
/// chat_template/bos/eos/add_bos_token, special_tokens_map.json, generation_config.json with bos/eos ids)
/// that the `tokenizers`/`transformers` libraries load and that tokenize text exactly like llama.cpp does
/// from the GGUF. `src` is the GGUF path for errors.
///
/// For SentencePiece vocabularies a `tokenizer.model` is written as well (the GGUF's pieces, scores
/// and types), so converting the result back keeps the real scores.
pub fn hf_tokenizer_from_gguf(meta: &Metadata, src: &Path) -> Result<TokenizerFiles> {
    let model = meta
        .get(KEY_MODEL)
        .ok_or_else(|| Error::format(src, KEY_MODEL, "missing"))?
        .as_str()
        .ok_or_else(|| Error::format(src, KEY_MODEL, "not a STRING"))?;
    let g = GgufVocab::read(meta, model, src)?;
    match model {
        "gpt2" => bpe_files(&g, meta, src),
        "llama" => spm_files(&g, meta, src),
        other => Err(Error::unsupported(
            src,
            KEY_MODEL,
            format!("{other:?}: only \"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece) vocabularies are supported"),
        )),
    }
}

/// The `tokenizer.*` keys as llama.cpp interprets them, with its defaults applied.
struct GgufVocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    scores: Vec<f32>,
    /// Explicit special ids (key present and in range), by kind.
    ids: HashMap<&'static str, u32>,
    /// Effective BOS/EOS after llama.cpp's per-type defaults (for the post-processor).
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos_key: Option<bool>,
    add_eos_key: Option<bool>,
    add_sep_key: Option<bool>,
    add_space_prefix_key: Option<bool>,
    /// llama.cpp strips whitespace after special tokens of models named phi-3.
    rstrip_specials: bool,
}

fn get_bool(meta: &Metadata, key: &str, src: &Path) -> Result<Option<bool>> {
    match meta.get(key) {
        None => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| {
            Error::format(
                src,
                key,
                format!("expected BOOL, found {:?}", v.value_type()),
            )
        }),
    }
}

fn get_id(meta: &Metadata, key: &str, src: &Path) -> Result<Option<i64>> {
    match meta.get(key) {
        None => Ok(None),
        Some(v) => v.as_i64().map(Some).ok_or_else(|| {
            Error::format(
                src,
                key,
                format!("expected UINT32, found {:?}", v.value_type()),
            )
        }),
    }
}

impl GgufVocab {
    fn read(meta: &Metadata, model: &str, src: &Path) -> Result<GgufVocab> {
        let tokens = match meta.get(KEY_TOKENS) {
            Some(Value::Array(Array::String(t))) => t.clone(),
            Some(v) => {
                return Err(Error::format(
                    src,
                    KEY_TOKENS,
                    format!("expected ARRAY[STRING], found {v}"),
                ))
            }
            None => return Err(Error::format(src, KEY_TOKENS, "missing")),
        };
        let n = tokens.len();
        if n == 0 {
            return Err(Error::format(src, KEY_TOKENS, "empty token list"));
        }
        // llama.cpp substitutes empty token strings the same way.
        let tokens: Vec<String> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t
                }
            })
            .collect();
        let mut seen = HashSet::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            if !seen.insert(t.as_str()) {
                return Err(Error::format(
                    src,
                    format!("{KEY_TOKENS}[{i}]"),
                    format!("duplicate token {t:?}"),
                ));
            }
        }
        let types = match meta.get(KEY_TOKEN_TYPE) {
            None => vec![TYPE_NORMAL; n],
            Some(Value::Array(a)) => {
                let v = a.as_i64s().filter(|v| v.len() >= n).ok_or_else(|| {
                    Error::format(
                        src,
                        KEY_TOKEN_TYPE,
                        format!("expected ARRAY[INT32] of at least {n} entries"),
                    )
                })?;
                v[..n].iter().map(|&t| t as i32).collect()
            }
            Some(v) => {
                return Err(Error::format(
                    src,
                    KEY_TOKEN_TYPE,
                    format!("expected ARRAY[INT32], found {v}"),
                ))
            }
        };
        let scores = match meta.get(KEY_SCORES) {
            None => vec![0.0; n],
            Some(Value::Array(a)) => {
                let v = a.as_f32s().filter(|v| v.len() >= n).ok_or_else(|| {
                    Error::format(
                        src,
                        KEY_SCORES,
                        format!("expected ARRAY[FLOAT32] of at least {n} entries"),
                    )
                })?;
                v[..n].to_vec()
            }
            Some(v) => {
                return Err(Error::format(
                    src,
                    KEY_SCORES,
                    format!("expected ARRAY[FLOAT32], found {v}"),
                ))
            }
        };
        let mut ids = HashMap::new();
        for (kind, key, _) in SPECIAL_KINDS {
            let Some(key) = key else { continue };
            // Out-of-range ids are ignored by llama.cpp (with a warning), so they are here too.
            if let Some(id) =
                get_id(meta, key, src)?.filter(|&id| id >= 0 && (id as u64) < n as u64)
            {
                ids.insert(*kind, id as u32);
            }
        }
        // llama.cpp's defaults when a key is absent: SPM bos=1 eos=2 unk=0; BPE bos=eos=11.
        let (def_bos, def_eos, def_unk) = if model == "llama" {
            (1, 2, Some(0))
        } else {
            (11, 11, None)
        };
        let in_range = |id: u32| ((id as usize) < n).then_some(id);
        let bos = ids.get("bos").copied().or_else(|| in_range(def_bos));
        let eos = ids.get("eos").copied().or_else(|| in_range(def_eos));
        let unk = ids
            .get("unk")
            .copied()
            .or_else(|| def_unk.and_then(in_range));
        let name = meta.get_str("general.name").unwrap_or("").to_lowercase();
        Ok(GgufVocab {
            tokens,
            types,
            scores,
            ids,
            bos,
            eos,
            unk,
            add_bos_key: get_bool(meta, "tokenizer.ggml.add_bos_token", src)?,
            add_eos_key: get_bool(meta, "tokenizer.ggml.add_eos_token", src)?,
            add_sep_key: get_bool(meta, "tokenizer.ggml.add_sep_token", src)?,
            add_space_prefix_key: get_bool(meta, KEY_ADD_SPACE_PREFIX, src)?,
            // llama.cpp gives every special token RSTRIP for models named phi-3 (`load`, per-token
            // attributes), except these three.
            rstrip_specials: name.contains("phi-3") || name.contains("phi3"),
        })
    }

    /// Tokens llama.cpp splits out of raw text before tokenizing: control, user-defined and unknown.
    fn is_partitioned(&self, id: usize) -> bool {
        matches!(
            self.types[id],
            TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN
        )
    }

    fn added_tokens(&self) -> Vec<Json> {
        (0..self.tokens.len())
            .filter(|&id| self.is_partitioned(id))
            .map(|id| {
                let content = &self.tokens[id];
                let rstrip = self.rstrip_specials
                    && !matches!(content.as_str(), "<unk>" | "<s>" | "<|endoftext|>");
                json!({
                    "id": id,
                    "content": content,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": rstrip,
                    // llama.cpp matches these tokens in the raw text, before any normalization.
                    "normalized": false,
                    "special": self.types[id] != TYPE_USER_DEFINED,
                })
            })
            .collect()
    }

    /// The model vocabulary. `skip_fillers` leaves out the `[PAD{id}]` entries the converter
    /// invents for ids the HF vocabulary lacks, so that converting back recreates them as UNUSED
    /// fillers instead of NORMAL tokens (llama.cpp's BPE can never produce them).
    fn vocab_json(&self, skip_fillers: bool) -> Map<String, Json> {
        self.tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| {
                !(skip_fillers && self.types[*i] == TYPE_UNUSED && **t == format!("[PAD{i}]"))
            })
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect()
    }

    fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize))
            .map(String::as_str)
    }

    /// A TemplateProcessing that adds BOS/EOS the way llama.cpp does with `add_special`, shaped
    /// so that gguf-py reads back the same add flags.
    fn post_processor(&self, add_bos: bool, add_eos: bool) -> Json {
        let bos = if add_bos { self.bos } else { None };
        let eos = if add_eos { self.eos } else { None };
        let special = |id: u32, type_id: u32| json!({"SpecialToken": {"id": self.tokens[id as usize], "type_id": type_id}});
        let seq = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
        let mut single = Vec::new();
        single.extend(bos.map(|b| special(b, 0)));
        single.push(seq("A", 0));
        single.extend(eos.map(|e| special(e, 0)));
        // gguf-py derives add_sep_token from what sits between $A and $B in the pair template.
        let mut pair = Vec::new();
        pair.extend(bos.map(|b| special(b, 0)));
        pair.push(seq("A", 0));
        match (self.add_sep_key, bos) {
            (Some(false), Some(b)) => {
                pair.extend(eos.map(|e| special(e, 0)));
                pair.push(special(b, 1));
            }
            (Some(true), _) => {
                if let Some(s) = self.ids.get("sep").copied().or(self.eos) {
                    pair.push(special(s, 0));
                }
            }
            _ => {}
        }
        pair.push(seq("B", 1));
        pair.extend(eos.map(|e| special(e, 1)));
        let mut specials = Map::new();
        for id in [
            bos,
            eos,
            self.ids
                .get("sep")
                .copied()
                .filter(|_| self.add_sep_key == Some(true)),
        ]
        .into_iter()
        .flatten()
        {
            let t = &self.tokens[id as usize];
            specials.insert(t.clone(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
        json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
    }

    /// tokenizer_config.json, special_tokens_map.json and generation_config.json.
    fn config_files(
        &self,
        meta: &Metadata,
        src: &Path,
        added_decoder: Map<String, Json>,
    ) -> Result<(Json, Json, Json)> {
        let mut tc = Map::new();
        tc.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        let mut stm = Map::new();
        for kind in ["bos", "eos", "unk", "sep", "pad", "mask"] {
            if let Some(t) = self.token(self.ids.get(kind).copied()) {
                tc.insert(format!("{kind}_token"), json!(t));
                stm.insert(format!("{kind}_token"), json!(t));
            }
        }
        // Only flags the GGUF states are written, so that converting back gives the same keys.
        for (kind, v) in [
            ("bos", self.add_bos_key),
            ("eos", self.add_eos_key),
            ("sep", self.add_sep_key),
        ] {
            if let Some(b) = v {
                tc.insert(format!("add_{kind}_token"), json!(b));
            }
        }
        if let Some(b) = self.add_space_prefix_key {
            tc.insert("add_prefix_space".into(), json!(b));
        }
        if let Some(t) = chat_template_json(meta, src)? {
            tc.insert("chat_template".into(), t);
        }
        tc.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(arch) = meta.get_str("general.architecture") {
            if let Some(ctx) = meta.get_i64(&format!("{arch}.context_length")) {
                tc.insert("model_max_length".into(), json!(ctx));
            }
        }
        if !added_decoder.is_empty() {
            tc.insert("added_tokens_decoder".into(), Json::Object(added_decoder));
        }
        let mut gc = Map::new();
        if let Some(b) = self.ids.get("bos") {
            gc.insert("bos_token_id".into(), json!(b));
        }
        // HF generation stops at any of these; llama.cpp stops at EOS, EOT and EOM alike.
        let mut stop: Vec<u32> = Vec::new();
        for kind in ["eos", "eot", "eom"] {
            if let Some(&id) = self.ids.get(kind) {
                if !stop.contains(&id) {
                    stop.push(id);
                }
            }
        }
        match stop.as_slice() {
            [] => {}
            [one] => {
                gc.insert("eos_token_id".into(), json!(one));
            }
            many => {
                gc.insert("eos_token_id".into(), json!(many));
            }
        }
        if let Some(p) = self.ids.get("pad") {
            gc.insert("pad_token_id".into(), json!(p));
        }
        Ok((Json::Object(tc), Json::Object(stm), Json::Object(gc)))
    }
}

/// `tokenizer.chat_template` (+ named templates) as tokenizer_config.json's `chat_template`.
fn chat_template_json(meta: &Metadata, src: &Path) -> Result<Option<Json>> {
    let default = match meta.get(KEY_CHAT_TEMPLATE) {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(Error::format(
                src,
                KEY_CHAT_TEMPLATE,
                format!("expected STRING, found {v}"),
            ))
        }
    };
    let names = match meta.get(KEY_CHAT_TEMPLATES) {
        None => Vec::new(),
        Some(Value::Array(Array::String(n))) => n.clone(),
        Some(v) => {
            return Err(Error::format(
                src,
                KEY_CHAT_TEMPLATES,
                format!("expected ARRAY[STRING], found {v}"),
            ))
        }
    };
    if names.is_empty() {
        return Ok(default.map(Json::String));
    }
    let mut list = Vec::new();
    if let Some(d) = default {
        list.push(json!({"name": "default", "template": d}));
    }
    for name in names {
        let key = format!("{KEY_CHAT_TEMPLATE}.{name}");
        let t = meta.get_str(&key).ok_or_else(|| {
            Error::format(
                src,
                &key,
                "listed in tokenizer.chat_templates but missing or not a STRING",
            )
        })?;
        list.push(json!({"name": name, "template": t}));
    }
    Ok(Some(Json::Array(list)))
}

fn finish_tokenizer_json(tokenizer: &Json, src: &Path) -> Result<String> {
    let text = serde_json::to_string_pretty(tokenizer)
        .map_err(|e| Error::format(src, "tokenizer.json", format!("cannot serialize: {e}")))?;
    // Whatever we hand out must load in the tokenizers library.
    tokenizers::Tokenizer::from_str(&text).map_err(|e| {
        Error::format(
            src,
            "tokenizer.json",
            format!("rebuilt tokenizer does not load in the tokenizers library: {e}"),
        )
    })?;
    Ok(text)
}

/// Byte-level BPE: llama.cpp's regexes as Split pre-tokenizers, then the byte-to-unicode map.
fn bpe_files(g: &GgufVocab, meta: &Metadata, src: &Path) -> Result<TokenizerFiles> {
    let pre_name = match meta.get(KEY_PRE) {
        // llama.cpp falls back to "default" (with a loud warning) when the key is missing.
        None => "default".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            return Err(Error::format(
                src,
                KEY_PRE,
                format!("expected STRING, found {v}"),
            ))
        }
    };
    let pre = pre_tokenizer(&pre_name).ok_or_else(|| {
        Error::unsupported(
            src,
            KEY_PRE,
            format!(
                "{pre_name:?}: no Hugging Face pre-tokenizer is known to split text like llama.cpp does for it \
                 (supported: default, llama-bpe and its aliases, qwen2, qwen35, smollm, gpt-2, falcon, tekken and aliases)"
            ),
        )
    })?;
    let merges = match meta.get(KEY_MERGES) {
        Some(Value::Array(Array::String(m))) => m,
        Some(v) => {
            return Err(Error::format(
                src,
                KEY_MERGES,
                format!("expected ARRAY[STRING], found {v}"),
            ))
        }
        None => {
            return Err(Error::format(
                src,
                KEY_MERGES,
                "missing (llama.cpp requires merges for gpt2 vocabularies)",
            ))
        }
    };
    let vocab: HashSet<&str> = g.tokens.iter().map(String::as_str).collect();
    let mut pairs = Vec::with_capacity(merges.len());
    for m in merges {
        // llama.cpp splits at the first space after position 0.
        let Some(pos) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
            continue;
        };
        let (a, b) = (&m[..pos], &m[pos + 1..]);
        // A merge whose sides or result are not tokens cannot produce a token id in llama.cpp
        // either (it falls back to bytes), and the tokenizers library rejects it: drop it.
        if vocab.contains(a) && vocab.contains(b) && vocab.contains(format!("{a}{b}").as_str()) {
            pairs.push(json!([a, b]));
        }
    }
    let add_bos = g.add_bos_key.unwrap_or(pre.add_bos);
    let add_eos = g.add_eos_key.unwrap_or(false);
    let mut pretokenizers: Vec<Json> = pre
        .regexes
        .iter()
        .map(|re| json!({"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false}))
        .collect();
    pretokenizers.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": g.added_tokens(),
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pretokenizers},
        "post_processor": g.post_processor(add_bos, add_eos),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": pre.ignore_merges,
            "vocab": g.vocab_json(true),
            "merges": pairs,
        },
    });
    let decoder = added_tokens_decoder(g, |_| true);
    let (tc, stm, gc) = g.config_files(meta, src, decoder)?;
    Ok(TokenizerFiles {
        tokenizer_json: Some(finish_tokenizer_json(&tokenizer, src)?),
        tokenizer_config: Some(tc),
        special_tokens_map: Some(stm),
        generation_config: Some(gc),
        sentencepiece_model: None,
    })
}

/// tokenizer_config.json's `added_tokens_decoder` for the partitioned tokens `keep` accepts.
fn added_tokens_decoder(g: &GgufVocab, keep: impl Fn(usize) -> bool) -> Map<String, Json> {
    g.added_tokens()
        .into_iter()
        .filter_map(|mut t| {
            let id = t.get("id").and_then(Json::as_u64)? as usize;
            if !keep(id) {
                return None;
            }
            // shift_remove keeps the other fields in order (remove would swap the last one in).
            t.as_object_mut()?.shift_remove("id");
            Some((id.to_string(), t))
        })
        .collect()
}

/// BPE merges equivalent to llama.cpp's SentencePiece merging: every split of a token into two
/// tokens is a merge, ranked by the merged token's score (highest first), ties in vocabulary order
/// of the merged token, then by the ids of the two sides (as HF's SentencePiece converter does).
fn spm_merges(tokens: &[String], scores: &[f32]) -> Vec<(usize, usize)> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(usize, usize, usize)> = Vec::new();
    for (merged, t) in tokens.iter().enumerate() {
        let start = merges.len();
        for (cut, _) in t.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (ids.get(&t[..cut]), ids.get(&t[cut..])) {
                merges.push((merged, l, r));
            }
        }
        merges[start..].sort_by_key(|&(_, l, r)| (l, r));
    }
    // Stable: equal scores keep the order built above.
    merges.sort_by(|a, b| scores[b.0].total_cmp(&scores[a.0]));
    merges.into_iter().map(|(_, l, r)| (l, r)).collect()
}

/// SentencePiece: a LlamaTokenizerFast-style BPE (byte fallback, spaces as U+2581, a prefix space
/// before every text run as llama.cpp adds one after each special token) plus a tokenizer.model.
fn spm_files(g: &GgufVocab, meta: &Metadata, src: &Path) -> Result<TokenizerFiles> {
    if let Some(pre) = meta.get_str(KEY_PRE).filter(|p| *p != "default") {
        return Err(Error::unsupported(
            src,
            KEY_PRE,
            format!("{pre:?}: llama.cpp's SentencePiece tokenizer has no pre-tokenizer; only \"default\" is expected"),
        ));
    }
    let add_space_prefix = g.add_space_prefix_key.unwrap_or(true);
    let add_bos = g.add_bos_key.unwrap_or(true);
    let add_eos = g.add_eos_key.unwrap_or(false);
    let merges: Vec<Json> = spm_merges(&g.tokens, &g.scores)
        .into_iter()
        .map(|(l, r)| json!([g.tokens[l], g.tokens[r]]))
        .collect();
    let has_bytes = g.types.contains(&TYPE_BYTE);
    let mut normalizers = Vec::new();
    if add_space_prefix {
        // Prepend runs on every text segment between added tokens, like llama.cpp's
        // "prefix with space if previous is special" (Metaspace's prepend_scheme "first" would not).
        normalizers.push(json!({"type": "Prepend", "prepend": SPM_SPACE}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": SPM_SPACE}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": g.added_tokens(),
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": g.post_processor(add_bos, add_eos),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": g.token(g.unk),
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": has_bytes,
            "ignore_merges": false,
            "vocab": g.vocab_json(false),
            "merges": merges,
        },
    });

    // Converting back reads tokens/scores/types from tokenizer.model and then applies
    // added_tokens_decoder (score -1000, CONTROL if special or special-looking, else
    // USER_DEFINED with U+2581 turned into spaces). List only the tokens that come back unchanged.
    let restorable = |id: usize| {
        let t = &g.tokens[id];
        g.scores[id] == SCORE_ADDED
            && match g.types[id] {
                TYPE_CONTROL => true,
                TYPE_USER_DEFINED => !looks_special(t) && !t.contains(SPM_SPACE),
                _ => false,
            }
    };
    let decoder = added_tokens_decoder(g, restorable);
    let unk_restored = g.unk.is_some_and(|u| restorable(u as usize));
    let any_unknown = g.types.contains(&TYPE_UNKNOWN);
    let pieces: Vec<SpPiece> = (0..g.tokens.len())
        .map(|i| {
            // GGUF token types and SentencePiece piece types share their numbering.
            let mut kind = match g.types[i] {
                t @ SP_NORMAL..=SP_BYTE => t,
                _ => SP_NORMAL,
            };
            // SentencePiece refuses a model without an unknown piece; the converter commonly turns
            // <unk> into CONTROL via added_tokens_decoder, which also turns it back.
            if !any_unknown && unk_restored && g.unk == Some(i as u32) {
                kind = SP_UNKNOWN;
            }
            SpPiece {
                piece: g.tokens[i].clone(),
                score: g.scores[i],
                kind,
            }
        })
        .collect();
    let names = SpNames {
        unk: g.token(g.unk),
        bos: g.token(g.bos),
        eos: g.token(g.eos),
        pad: g.token(g.ids.get("pad").copied()),
    };
    let model = write_sentencepiece(&pieces, &names, add_space_prefix);
    let (tc, stm, gc) = g.config_files(meta, src, decoder)?;
    Ok(TokenizerFiles {
        tokenizer_json: Some(finish_tokenizer_json(&tokenizer, src)?),
        tokenizer_config: Some(tc),
        special_tokens_map: Some(stm),
        generation_config: Some(gc),
        sentencepiece_model: Some(model),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    const BPE_TOKENS: [&str; 13] = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "a",
        "b",
        "\u{120}",
        "ab",
        "\u{120}a",
        "\u{120}ab",
        "1",
        "2",
        "12",
        "<tool>",
    ];
    // "Ġ a" ranks before "a b", so " ab" becomes "Ġa" + "b" -> "Ġab" rather than "Ġ" + "ab".
    const BPE_MERGES: [&str; 4] = ["\u{120} a", "a b", "\u{120}a b", "1 2"];
    const TEMPLATE: &str =
        "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}";

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn src() -> PathBuf {
        PathBuf::from("/models/tiny")
    }

    /// A byte-level BPE tokenizer.json as Hugging Face writes one (ByteLevel pre-tokenizer).
    fn tiny_bpe_tokenizer_json(post_processor: Json) -> String {
        let vocab: Map<String, Json> = BPE_TOKENS
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
        let added = |id: usize, special: bool| {
            json!({"id": id, "content": BPE_TOKENS[id], "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": !special, "special": special})
        };
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [added(0, true), added(1, true), added(2, true), added(12, false)],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": BPE_MERGES},
        })
        .to_string()
    }

    fn tiny_bpe_files() -> TokenizerFiles {
        TokenizerFiles {
            tokenizer_json: Some(tiny_bpe_tokenizer_json(
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
            )),
            tokenizer_config: Some(json!({
                "add_prefix_space": false,
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "pad_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "chat_template": TEMPLATE,
            })),
            ..TokenizerFiles::default()
        }
    }

    /// GGUF keys of a byte-level vocabulary as llama.cpp's converter writes them.
    fn tiny_bpe_meta(pre: &str) -> Metadata {
        let mut m = Metadata::new();
        m.set(KEY_MODEL, Value::String("gpt2".into()));
        m.set(KEY_PRE, Value::String(pre.into()));
        let mut tokens = strings(&BPE_TOKENS);
        tokens.push("[PAD13]".into());
        m.set(KEY_TOKENS, Value::Array(Array::String(tokens)));
        let types = vec![3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 5];
        m.set(KEY_TOKEN_TYPE, Value::Array(Array::I32(types)));
        m.set(
            KEY_MERGES,
            Value::Array(Array::String(strings(&BPE_MERGES))),
        );
        m.set("tokenizer.ggml.bos_token_id", Value::U32(1));
        m.set("tokenizer.ggml.eos_token_id", Value::U32(2));
        m.set("tokenizer.ggml.unknown_token_id", Value::U32(0));
        m.set("tokenizer.ggml.padding_token_id", Value::U32(2));
        m.set("tokenizer.ggml.add_bos_token", Value::Bool(false));
        m.set(KEY_CHAT_TEMPLATE, Value::String(TEMPLATE.into()));
        m
    }

    /// One ModelProto.pieces entry, encoded by hand: piece (field 1, bytes), score (2, fixed32),
    /// type (3, varint).
    fn piece_bytes(piece: &str, score: f32, kind: u8) -> Vec<u8> {
        let mut inner = vec![0x0a, piece.len() as u8];
        inner.extend_from_slice(piece.as_bytes());
        inner.push(0x15);
        inner.extend_from_slice(&score.to_le_bytes());
        inner.extend_from_slice(&[0x18, kind]);
        let mut out = vec![0x0a, inner.len() as u8];
        out.extend(inner);
        out
    }

    /// A tokenizer.model with a few pieces of every type and an unrelated trainer_spec field.
    fn tiny_sentencepiece_model() -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(piece_bytes("<unk>", 0.0, 2));
        m.extend(piece_bytes("<s>", 0.0, 3));
        m.extend(piece_bytes("</s>", 0.0, 3));
        m.extend(piece_bytes("<0x21>", 0.0, 6));
        m.extend(piece_bytes("\u{2581}a", -1.0, 1));
        m.extend(piece_bytes("b", -2.0, 1));
        m.extend(piece_bytes("<user>", 0.0, 4));
        m.extend(piece_bytes("<unused0>", 0.0, 5));
        // trainer_spec { model_type: BPE } — must be skipped.
        m.extend([0x12, 0x02, 0x18, 0x02]);
        m
    }

    fn assert_same_tokenizer_keys(original: &Metadata, round_trip: &Metadata) {
        for (k, v) in original.iter() {
            assert_eq!(round_trip.get(k), Some(v), "key {k}");
        }
        for (k, _) in round_trip.iter() {
            assert!(original.get(k).is_some(), "unexpected key {k}");
        }
    }

    fn encode(files: &TokenizerFiles, text: &str, add_special: bool) -> Vec<u32> {
        let t = tokenizers::Tokenizer::from_str(files.tokenizer_json.as_ref().unwrap()).unwrap();
        t.encode(text, add_special).unwrap().get_ids().to_vec()
    }

    #[test]
    fn chktxt_is_llama_cpp_probe_text() {
        assert_eq!(sha256_hex(CHKTXT.as_bytes()), CHKTXT_SHA256);
        assert_eq!(CHKTXT.chars().count(), 350);
    }

    #[test]
    fn python_list_repr_matches_str_of_list() {
        assert_eq!(python_list_repr(&[]), "[]");
        assert_eq!(python_list_repr(&[1, 22, 333]), "[1, 22, 333]");
    }

    #[test]
    fn digest_table_names_the_required_pre_tokenizers() {
        for (digest, name) in [
            (
                "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5",
                "llama-bpe",
            ),
            (
                "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea",
                "qwen2",
            ),
            (
                "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c",
                "qwen2",
            ),
            (
                "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249",
                "smollm",
            ),
            (
                "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454",
                "gpt-2",
            ),
            (
                "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e",
                "tekken",
            ),
            (
                "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085",
                "phi-2",
            ),
            // Listed for mpt and then olmo: the converter's later check wins.
            (
                "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166",
                "olmo",
            ),
        ] {
            assert_eq!(pre_name_for_digest(digest), Some(name), "{digest}");
        }
        assert_eq!(pre_name_for_digest(&"0".repeat(64)), None);
        for (digest, name, _) in PRE_TOKENIZER_DIGESTS {
            assert!(
                digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
                "{name}"
            );
        }
    }

    #[test]
    fn forward_byte_level_bpe_writes_llama_cpp_keys_and_types() {
        let meta =
            build_gguf_vocab(&tiny_bpe_files(), &json!({}), 15, &src(), Some("smollm")).unwrap();
        assert_eq!(meta.get(KEY_MODEL), Some(&Value::String("gpt2".into())));
        assert_eq!(meta.get(KEY_PRE), Some(&Value::String("smollm".into())));
        let mut tokens = strings(&BPE_TOKENS);
        tokens.extend(["[PAD13]".to_string(), "[PAD14]".to_string()]);
        assert_eq!(
            meta.get(KEY_TOKENS),
            Some(&Value::Array(Array::String(tokens)))
        );
        let types = vec![3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 5, 5];
        assert_eq!(
            meta.get(KEY_TOKEN_TYPE),
            Some(&Value::Array(Array::I32(types)))
        );
        assert!(
            meta.get(KEY_SCORES).is_none(),
            "the gpt2 path writes no scores"
        );
        assert_eq!(
            meta.get(KEY_MERGES),
            Some(&Value::Array(Array::String(strings(&BPE_MERGES))))
        );
        assert_eq!(
            meta.get("tokenizer.ggml.bos_token_id"),
            Some(&Value::U32(1))
        );
        assert_eq!(
            meta.get("tokenizer.ggml.eos_token_id"),
            Some(&Value::U32(2))
        );
        assert_eq!(
            meta.get("tokenizer.ggml.unknown_token_id"),
            Some(&Value::U32(0))
        );
        assert_eq!(
            meta.get("tokenizer.ggml.padding_token_id"),
            Some(&Value::U32(2))
        );
        // A ByteLevel post-processor means neither BOS nor EOS is added.
        assert_eq!(
            meta.get("tokenizer.ggml.add_bos_token"),
            Some(&Value::Bool(false))
        );
        assert_eq!(
            meta.get("tokenizer.ggml.add_eos_token"),
            Some(&Value::Bool(false))
        );
        assert_eq!(meta.get(KEY_ADD_SPACE_PREFIX), Some(&Value::Bool(false)));
        assert_eq!(
            meta.get(KEY_CHAT_TEMPLATE),
            Some(&Value::String(TEMPLATE.into()))
        );
    }

    #[test]
    fn forward_token_ids_beyond_the_embedding_are_a_mismatch() {
        let err = build_gguf_vocab(&tiny_bpe_files(), &json!({}), 10, &src(), Some("smollm"))
            .unwrap_err();
        assert!(
            matches!(&err, Error::Mismatch { path, field, .. } if path.ends_with("tokenizer.json") && field == "model.vocab"),
            "{err}"
        );
    }

    #[test]
    fn forward_unknown_pre_tokenizer_is_unsupported_with_digest() {
        let files = tiny_bpe_files();
        let err = gguf_vocab_from_hf(&files, &json!({}), 13, &src()).unwrap_err();
        let tokenizer =
            tokenizers::Tokenizer::from_str(files.tokenizer_json.as_ref().unwrap()).unwrap();
        let digest = chktxt_digest(&tokenizer, Path::new("tokenizer.json")).unwrap();
        match err {
            Error::Unsupported { path, field, msg } => {
                assert_eq!(path, src().join("tokenizer.json"));
                assert_eq!(field, "pre_tokenizer");
                assert!(msg.contains(&digest), "{msg}");
            }
            other => panic!("expected Unsupported, got {other}"),
        }
    }

    #[test]
    fn forward_merge_pairs_are_joined_with_inner_spaces_as_u0120() {
        let merges = json!([["a b", "c"], ["d", "e"]]);
        let out = hf_merges(Some(&merges), Path::new("tokenizer.json")).unwrap();
        assert_eq!(out, vec!["a\u{120}b c".to_string(), "d e".to_string()]);
        let bad = json!(["a b", 3]);
        let err = hf_merges(Some(&bad), Path::new("tokenizer.json")).unwrap_err();
        assert!(
            matches!(&err, Error::Format { field, .. } if field == "model.merges[1]"),
            "{err}"
        );
    }

    #[test]
    fn forward_sentencepiece_pieces_scores_types_fillers_and_added_tokens() {
        let files = TokenizerFiles {
            sentencepiece_model: Some(tiny_sentencepiece_model()),
            tokenizer_config: Some(json!({
                "add_bos_token": true,
                "add_eos_token": false,
                "added_tokens_decoder": {
                    "8": {"content": "<|im_end|>", "special": true},
                    "9": {"content": "\u{2581}tool", "special": false},
                },
                "chat_template": TEMPLATE,
            })),
            ..TokenizerFiles::default()
        };
        let config = json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 99});
        let meta = gguf_vocab_from_hf(&files, &config, 12, &src()).unwrap();
        let tokens = strings(&[
            "<unk>",
            "<s>",
            "</s>",
            "<0x21>",
            "\u{2581}a",
            "b",
            "<user>",
            "<unused0>",
            "<|im_end|>",
            " tool",
            "[PAD10]",
            "[PAD11]",
        ]);
        assert_eq!(meta.get(KEY_MODEL), Some(&Value::String("llama".into())));
        assert_eq!(meta.get(KEY_PRE), Some(&Value::String("default".into())));
        assert_eq!(
            meta.get(KEY_TOKENS),
            Some(&Value::Array(Array::String(tokens)))
        );
        let scores = vec![
            0.0, 0.0, 0.0, 0.0, -1.0, -2.0, 0.0, 0.0, -1000.0, -1000.0, -10000.0, -10000.0,
        ];
        assert_eq!(
            meta.get(KEY_SCORES),
            Some(&Value::Array(Array::F32(scores)))
        );
        // USER_DEFINED pieces of the model become NORMAL, as in the converter.
        let types = vec![2, 3, 3, 6, 1, 1, 1, 5, 3, 4, 5, 5];
        assert_eq!(
            meta.get(KEY_TOKEN_TYPE),
            Some(&Value::Array(Array::I32(types)))
        );
        assert_eq!(
            meta.get("tokenizer.ggml.bos_token_id"),
            Some(&Value::U32(1))
        );
        assert_eq!(
            meta.get("tokenizer.ggml.eos_token_id"),
            Some(&Value::U32(2))
        );
        assert!(
            meta.get("tokenizer.ggml.padding_token_id").is_none(),
            "id 99 is out of range"
        );
        assert_eq!(
            meta.get("tokenizer.ggml.add_bos_token"),
            Some(&Value::Bool(true))
        );
        assert_eq!(
            meta.get("tokenizer.ggml.add_eos_token"),
            Some(&Value::Bool(false))
        );
        assert!(meta.get(KEY_MERGES).is_none());
    }

    #[test]
    fn flags_of_the_wrong_type_are_refused_by_file_and_field() {
        // Each mutation puts a string (or number) where true/false belongs; the converter's
        // Python would read "false" as true, a default would hide it.
        let bpe = |edit: &dyn Fn(&mut Json, &mut Json)| {
            let mut files = tiny_bpe_files();
            let mut tj: Json =
                serde_json::from_str(files.tokenizer_json.as_ref().unwrap()).unwrap();
            let tc = files.tokenizer_config.as_mut().unwrap();
            edit(&mut tj, tc);
            files.tokenizer_json = Some(tj.to_string());
            build_gguf_vocab(&files, &json!({}), 14, &src(), Some("smollm"))
        };
        // (A wrong-typed normalizer flag is refused too, by the tokenizers library reading
        // the same tokenizer.json first.)
        type Edit<'a> = &'a dyn Fn(&mut Json, &mut Json);
        let cases: [(Edit<'_>, &str, &str); 4] = [
            (
                &|tj, _| tj["model"]["byte_fallback"] = json!("false"),
                "tokenizer.json",
                "model.byte_fallback",
            ),
            (
                &|tj, _| tj["model"]["ignore_merges"] = json!(1),
                "tokenizer.json",
                "model.ignore_merges",
            ),
            (
                &|_, tc| tc["add_prefix_space"] = json!("no"),
                "tokenizer_config.json",
                "add_prefix_space",
            ),
            (
                &|_, tc| tc["add_bos_token"] = json!("true"),
                "tokenizer_config.json",
                "add_bos_token",
            ),
        ];
        for (edit, file, want) in cases {
            let err = bpe(edit).unwrap_err();
            assert!(
                matches!(&err, Error::Format { path, field, msg }
                    if path.ends_with(file) && field == want && msg.contains("true or false")),
                "{want}: {err}"
            );
        }
        // null is absent, as the Hub's files write it.
        bpe(&|_, tc| tc["add_prefix_space"] = Json::Null).unwrap();

        let files = TokenizerFiles {
            sentencepiece_model: Some(tiny_sentencepiece_model()),
            tokenizer_config: Some(
                json!({"added_tokens_decoder": {"9": {"content": "<x>", "special": "yes"}}}),
            ),
            ..TokenizerFiles::default()
        };
        let err = gguf_vocab_from_hf(&files, &json!({}), 12, &src()).unwrap_err();
        assert!(
            matches!(&err, Error::Format { field, .. } if field == "added_tokens_decoder.9.special"),
            "{err}"
        );
    }

    #[test]
    fn forward_duplicate_token_strings_are_a_format_error() {
        let files = TokenizerFiles {
            sentencepiece_model: Some(tiny_sentencepiece_model()),
            tokenizer_config: Some(
                json!({"added_tokens_decoder": {"9": {"content": "b", "special": true}}}),
            ),
            ..TokenizerFiles::default()
        };
        let err = gguf_vocab_from_hf(&files, &json!({}), 12, &src()).unwrap_err();
        assert!(
            matches!(&err, Error::Format { field, msg, .. } if field == KEY_TOKENS && msg.contains("ids 5 and 9")),
            "{err}"
        );
    }

    #[test]
    fn sentencepiece_parse_rejects_truncated_model() {
        let mut model = tiny_sentencepiece_model();
        model.truncate(5);
        let err = parse_sentencepiece(&model, Path::new("/m/tokenizer.model")).unwrap_err();
        assert!(
            matches!(&err, Error::Format { path, field, .. } if path.ends_with("tokenizer.model") && field == "ModelProto"),
            "{err}"
        );
        let err = parse_sentencepiece(&[], Path::new("/m/tokenizer.model")).unwrap_err();
        assert!(
            matches!(&err, Error::Format { field, .. } if field == "pieces"),
            "{err}"
        );
    }

    #[test]
    fn sentencepiece_writer_output_parses_back() {
        let pieces = vec![
            SpPiece {
                piece: "<unk>".into(),
                score: 0.0,
                kind: SP_UNKNOWN,
            },
            SpPiece {
                piece: "\u{2581}hello".into(),
                score: -3.5,
                kind: SP_NORMAL,
            },
            SpPiece {
                piece: "<0x0A>".into(),
                score: 0.0,
                kind: SP_BYTE,
            },
        ];
        let names = SpNames {
            unk: Some("<unk>"),
            bos: None,
            eos: None,
            pad: None,
        };
        let bytes = write_sentencepiece(&pieces, &names, true);
        let back = parse_sentencepiece(&bytes, Path::new("tokenizer.model")).unwrap();
        let got: Vec<(&str, f32, i32)> = back
            .iter()
            .map(|p| (p.piece.as_str(), p.score, p.kind))
            .collect();
        assert_eq!(
            got,
            vec![
                ("<unk>", 0.0, 2),
                ("\u{2581}hello", -3.5, 1),
                ("<0x0A>", 0.0, 6)
            ]
        );
    }

    #[test]
    fn reverse_byte_level_bpe_splits_digits_for_smollm_and_round_trips() {
        let meta = tiny_bpe_meta("smollm");
        let files = hf_tokenizer_from_gguf(&meta, Path::new("/m/model.gguf")).unwrap();
        // "<|im_start|>" is matched whole, smollm splits digits one by one ("12" never merges),
        // the space before them stays alone, and no BOS is added (add_bos_token = false).
        assert_eq!(
            encode(&files, "<|im_start|>ab 12<|im_end|>", true),
            vec![1, 6, 5, 9, 10, 2]
        );
        assert_eq!(encode(&files, "<tool> ab", true), vec![12, 8]);
        let tc = files.tokenizer_config.as_ref().unwrap();
        assert_eq!(tc["bos_token"], json!("<|im_start|>"));
        assert_eq!(tc["add_bos_token"], json!(false));
        assert_eq!(tc["chat_template"], json!(TEMPLATE));
        assert_eq!(
            files.generation_config.as_ref().unwrap()["eos_token_id"],
            json!(2)
        );
        assert!(files.sentencepiece_model.is_none());

        let back = build_gguf_vocab(&files, &json!({}), 14, &src(), Some("smollm")).unwrap();
        assert_same_tokenizer_keys(&meta, &back);
    }

    #[test]
    fn reverse_byte_level_bpe_follows_llama_bpe_rules() {
        let mut meta = tiny_bpe_meta("llama-bpe");
        meta.remove("tokenizer.ggml.add_bos_token");
        let files = hf_tokenizer_from_gguf(&meta, Path::new("/m/model.gguf")).unwrap();
        // llama-bpe adds BOS unless told otherwise and groups up to three digits.
        assert_eq!(encode(&files, "ab 12", true), vec![1, 6, 5, 11]);
        assert_eq!(encode(&files, "ab 12", false), vec![6, 5, 11]);
        let tj: Json = serde_json::from_str(files.tokenizer_json.as_ref().unwrap()).unwrap();
        assert_eq!(tj["model"]["ignore_merges"], json!(true));
    }

    #[test]
    fn reverse_rejects_unsupported_or_malformed_vocabularies() {
        let gguf = Path::new("/m/model.gguf");
        let field_of = |e: Error| match e {
            Error::Unsupported { field, .. } => ("unsupported", field),
            Error::Format { field, .. } => ("format", field),
            other => panic!("unexpected {other}"),
        };
        let mut m = tiny_bpe_meta("smollm");
        m.set(KEY_MODEL, Value::String("bert".into()));
        assert_eq!(
            field_of(hf_tokenizer_from_gguf(&m, gguf).unwrap_err()),
            ("unsupported", KEY_MODEL.into())
        );

        let m = tiny_bpe_meta("chameleon");
        assert_eq!(
            field_of(hf_tokenizer_from_gguf(&m, gguf).unwrap_err()),
            ("unsupported", KEY_PRE.into())
        );

        let mut m = tiny_bpe_meta("smollm");
        m.remove(KEY_MERGES);
        assert_eq!(
            field_of(hf_tokenizer_from_gguf(&m, gguf).unwrap_err()),
            ("format", KEY_MERGES.into())
        );

        let mut m = tiny_bpe_meta("smollm");
        m.remove(KEY_TOKENS);
        assert_eq!(
            field_of(hf_tokenizer_from_gguf(&m, gguf).unwrap_err()),
            ("format", KEY_TOKENS.into())
        );

        let mut m = tiny_bpe_meta("smollm");
        let mut tokens = strings(&BPE_TOKENS);
        tokens.push("a".into());
        m.set(KEY_TOKENS, Value::Array(Array::String(tokens)));
        assert_eq!(
            field_of(hf_tokenizer_from_gguf(&m, gguf).unwrap_err()),
            ("format", format!("{KEY_TOKENS}[13]"))
        );

        let mut m = tiny_bpe_meta("smollm");
        m.set(
            KEY_TOKEN_TYPE,
            Value::Array(Array::String(vec!["1".into()])),
        );
        assert_eq!(
            field_of(hf_tokenizer_from_gguf(&m, gguf).unwrap_err()),
            ("format", KEY_TOKEN_TYPE.into())
        );
    }

    #[test]
    fn forward_missing_tokenizer_files_is_a_format_error() {
        let err =
            gguf_vocab_from_hf(&TokenizerFiles::default(), &json!({}), 10, &src()).unwrap_err();
        assert!(
            matches!(&err, Error::Format { field, .. } if field == "tokenizer"),
            "{err}"
        );
    }

    #[test]
    fn sentencepiece_merges_are_ranked_by_merged_score_then_ids() {
        let tokens = strings(&["a", "b", "c", "ab", "bc", "abc", "\u{2581}", "\u{2581}a"]);
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0, 0.0, -2.0];
        let merges = spm_merges(&tokens, &scores);
        // bc (-1) first; ab and ▁a tie at -2 and keep vocabulary order; abc (-3) last, its two
        // splits ordered by the ids of their sides: (a, bc) before (ab, c).
        assert_eq!(merges, vec![(1, 2), (0, 1), (6, 0), (0, 4), (3, 2)]);
    }

    /// GGUF keys of a SentencePiece vocabulary shaped like a converted TinyLlama.
    fn tiny_spm_meta() -> Metadata {
        let tokens = strings(&[
            "<unk>",
            "<s>",
            "</s>",
            "<0x21>",
            "\u{2581}",
            "a",
            "b",
            "ab",
            "\u{2581}a",
            "\u{2581}ab",
            "<|im_end|>",
            "[PAD11]",
        ]);
        let scores = vec![
            -1000.0, -1000.0, -1000.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -1000.0, -10000.0,
        ];
        let types = vec![3, 3, 3, 6, 1, 1, 1, 1, 1, 1, 3, 5];
        let mut m = Metadata::new();
        m.set("general.name", Value::String("Tiny".into()));
        m.set(KEY_MODEL, Value::String("llama".into()));
        m.set(KEY_PRE, Value::String("default".into()));
        m.set(KEY_TOKENS, Value::Array(Array::String(tokens)));
        m.set(KEY_SCORES, Value::Array(Array::F32(scores)));
        m.set(KEY_TOKEN_TYPE, Value::Array(Array::I32(types)));
        m.set("tokenizer.ggml.bos_token_id", Value::U32(1));
        m.set("tokenizer.ggml.eos_token_id", Value::U32(2));
        m.set("tokenizer.ggml.unknown_token_id", Value::U32(0));
        m.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
        m.set("tokenizer.ggml.add_eos_token", Value::Bool(false));
        m.set(KEY_CHAT_TEMPLATE, Value::String(TEMPLATE.into()));
        m
    }

    #[test]
    fn reverse_sentencepiece_prefixes_a_space_after_specials_and_round_trips() {
        let meta = tiny_spm_meta();
        let files = hf_tokenizer_from_gguf(&meta, Path::new("/m/model.gguf")).unwrap();
        // BOS first; every text run gets a leading ▁ (also after <|im_end|>, as in llama.cpp);
        // "!" has no piece and falls back to its byte token.
        assert_eq!(
            encode(&files, "ab<|im_end|>ab!", true),
            vec![1, 9, 10, 9, 3]
        );
        assert_eq!(encode(&files, "ab", false), vec![9]);
        // The tokenizer.model carries the pieces; <unk> is stored as UNKNOWN so SentencePiece
        // accepts the model, and added_tokens_decoder turns it back into CONTROL.
        let pieces =
            parse_sentencepiece(files.sentencepiece_model.as_ref().unwrap(), Path::new("t"))
                .unwrap();
        assert_eq!(pieces.len(), 12);
        assert_eq!((pieces[0].kind, pieces[7].score), (SP_UNKNOWN, -4.0));

        let back = gguf_vocab_from_hf(&files, &json!({}), 12, &src()).unwrap();
        let mut expected = meta.clone();
        expected.remove("general.name");
        assert_same_tokenizer_keys(&expected, &back);
    }

    #[test]
    fn forward_llama_hf_fallback_without_tokenizer_model() {
        let mut files =
            hf_tokenizer_from_gguf(&tiny_spm_meta(), Path::new("/m/model.gguf")).unwrap();
        files.sentencepiece_model = None;
        let meta = gguf_vocab_from_hf(&files, &json!({}), 13, &src()).unwrap();
        assert_eq!(meta.get(KEY_MODEL), Some(&Value::String("llama".into())));
        assert_eq!(
            meta.get(KEY_SCORES),
            Some(&Value::Array(Array::F32(vec![-1000.0; 13])))
        );
        let types = vec![3, 3, 3, 6, 1, 1, 1, 1, 1, 1, 3, 1, 5];
        assert_eq!(
            meta.get(KEY_TOKEN_TYPE),
            Some(&Value::Array(Array::I32(types)))
        );
        assert_eq!(
            meta.get("tokenizer.ggml.bos_token_id"),
            Some(&Value::U32(1))
        );
        assert_eq!(
            meta.get("tokenizer.ggml.add_bos_token"),
            Some(&Value::Bool(true))
        );
    }

    #[test]
    fn forward_template_ending_in_another_token_makes_it_eos_and_old_eos_eot() {
        let mut files =
            hf_tokenizer_from_gguf(&tiny_spm_meta(), Path::new("/m/model.gguf")).unwrap();
        let mut tj: Json = serde_json::from_str(files.tokenizer_json.as_ref().unwrap()).unwrap();
        tj["post_processor"] = json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "<|im_end|>", "type_id": 0}}],
            "pair": [],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                               "<|im_end|>": {"id": "<|im_end|>", "ids": [10], "tokens": ["<|im_end|>"]}},
        });
        files.tokenizer_json = Some(tj.to_string());
        let meta = gguf_vocab_from_hf(&files, &json!({}), 12, &src()).unwrap();
        assert_eq!(
            meta.get("tokenizer.ggml.eos_token_id"),
            Some(&Value::U32(10))
        );
        assert_eq!(
            meta.get("tokenizer.ggml.eot_token_id"),
            Some(&Value::U32(2))
        );
        assert_eq!(
            meta.get("tokenizer.ggml.add_eos_token"),
            Some(&Value::Bool(true))
        );
    }

    #[test]
    fn chat_template_lists_become_named_templates_and_back() {
        let list =
            json!([{"name": "default", "template": "D"}, {"name": "tool use", "template": "T"}]);
        let mut meta = Metadata::new();
        write_chat_template_list(list.as_array().unwrap(), &mut meta);
        assert_eq!(
            meta.get(KEY_CHAT_TEMPLATE),
            Some(&Value::String("D".into()))
        );
        assert_eq!(
            meta.get("tokenizer.chat_template.tool_use"),
            Some(&Value::String("T".into()))
        );
        assert_eq!(
            meta.get(KEY_CHAT_TEMPLATES),
            Some(&Value::Array(Array::String(vec!["tool_use".into()])))
        );
        let back = chat_template_json(&meta, Path::new("m.gguf"))
            .unwrap()
            .unwrap();
        assert_eq!(
            back,
            json!([{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}])
        );
    }
}
