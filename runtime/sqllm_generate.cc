// sqllm_generate: greedy decoding with the KV cache over an sqllm-onnx export folder, through the
// ONNX Runtime C++ API and the SqueezeMatMul op library. CPU, batch 1, token ids in and out.
//
//   sqllm_generate DIR [--max-new-tokens N] [--ops-library PATH] [--eos ID[,ID]] [--ignore-eos]
//                  [--threads N] TOKEN_ID [TOKEN_ID ...]
//
// DIR is what `sqllm-onnx export` writes: model.onnx (an Optimum text-generation-with-past decoder)
// and a copy of libsqllm_ops.so. The graph's inputs are input_ids, attention_mask, position_ids
// (absent for OPT) and past_key_values.N.key/value; its outputs logits and present.N.key/value.
// fp32 and fp16 exports both work: the KV-cache and logits types come from the session.
// Exit status: 0 on success, 1 on a runtime error, 2 on bad arguments.

// The API table is fetched by hand so that a too-old libonnxruntime gives a clear error.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <sys/stat.h>
#include <vector>

namespace {

constexpr const char* kUsage =
    "usage: sqllm_generate DIR [options] TOKEN_ID [TOKEN_ID ...]\n"
    "\n"
    "Greedy decoding with the KV cache over an sqllm-onnx export folder DIR (model.onnx and\n"
    "libsqllm_ops.so) through the ONNX Runtime C++ API; CPU, batch 1. The prompt is given as\n"
    "token ids (separated by spaces or commas): no tokenizer is linked.\n"
    "\n"
    "options:\n"
    "  --max-new-tokens N   tokens to generate (default 32)\n"
    "  --ops-library PATH   the SqueezeMatMul op library (default DIR/libsqllm_ops.so)\n"
    "  --eos ID[,ID...]     stop after generating one of these ids\n"
    "                       (default: eos_token_id of DIR/generation_config.json or DIR/config.json)\n"
    "  --ignore-eos         never stop before --max-new-tokens\n"
    "  --threads N          intra-op threads (default 0: ONNX Runtime's choice)\n"
    "  -h, --help           this text\n"
    "\n"
    "Prints the generated ids on a line starting with 'tokens:', then the prefill time and the\n"
    "milliseconds per new token.\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string dir;
  std::string ops_library;
  std::vector<int64_t> prompt;
  long max_new_tokens = 32;
  long threads = 0;
  std::vector<int64_t> eos;
  bool eos_given = false;
  bool ignore_eos = false;
};

bool IsFile(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool IsDir(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

long ParseLong(const std::string& text, const std::string& what, long min_value) {
  errno = 0;
  char* end = nullptr;
  long value = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0 || value < min_value)
    throw UsageError(what + " must be an integer >= " + std::to_string(min_value) + ", got '" + text + "'");
  return value;
}

// "1,17, 29" or "1" -> ids; every piece must be a non-negative integer.
void ParseIds(const std::string& text, const std::string& what, std::vector<int64_t>& out) {
  std::string piece;
  std::stringstream stream(text);
  while (std::getline(stream, piece, ',')) {
    piece.erase(0, piece.find_first_not_of(" \t"));
    piece.erase(piece.find_last_not_of(" \t") + 1);
    if (piece.empty()) continue;
    errno = 0;
    char* end = nullptr;
    long long value = std::strtoll(piece.c_str(), &end, 10);
    if (*end != '\0' || errno != 0 || value < 0)
      throw UsageError(what + " must be non-negative integers, got '" + piece + "'");
    out.push_back(static_cast<int64_t>(value));
  }
}

Args ParseArgs(int argc, char** argv) {
  Args args;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&](const std::string& name) -> std::string {
      if (i + 1 >= argc) throw UsageError(name + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (a == "--max-new-tokens") {
      args.max_new_tokens = ParseLong(value(a), a, 1);
    } else if (a == "--threads") {
      args.threads = ParseLong(value(a), a, 0);
    } else if (a == "--ops-library") {
      args.ops_library = value(a);
    } else if (a == "--eos") {
      ParseIds(value(a), a, args.eos);
      args.eos_given = true;
    } else if (a == "--ignore-eos") {
      args.ignore_eos = true;
    } else if (a.size() > 1 && a[0] == '-' && !(a[1] >= '0' && a[1] <= '9')) {
      throw UsageError("unknown option '" + a + "'");
    } else {
      positional.push_back(a);
    }
  }
  if (positional.empty()) throw UsageError("missing DIR (an sqllm-onnx export folder)");
  args.dir = positional[0];
  for (size_t i = 1; i < positional.size(); ++i) ParseIds(positional[i], "token ids", args.prompt);
  if (args.prompt.empty()) throw UsageError("missing the prompt's token ids");
  if (args.ops_library.empty()) args.ops_library = args.dir + "/libsqllm_ops.so";
  return args;
}

// eos_token_id from a Hugging Face JSON file: an integer, a list of integers, null or absent.
// A few lines of scanning instead of a JSON library: the key appears once in these files.
std::vector<int64_t> ReadEos(const std::string& path, bool& found) {
  found = false;
  std::ifstream file(path);
  if (!file) return {};
  std::stringstream buffer;
  buffer << file.rdbuf();
  const std::string text = buffer.str();
  const std::string key = "\"eos_token_id\"";
  size_t p = text.find(key);
  if (p == std::string::npos) return {};
  p = text.find(':', p + key.size());
  if (p == std::string::npos) return {};
  p = text.find_first_not_of(" \t\r\n", p + 1);
  if (p == std::string::npos) return {};
  const size_t end = text.find_first_of(text[p] == '[' ? "]" : ",}", p);
  found = true;
  std::vector<int64_t> ids;  // null gives none
  std::string digits;
  for (char c : text.substr(p, end == std::string::npos ? std::string::npos : end - p) + " ") {
    if (c >= '0' && c <= '9') {
      digits += c;
    } else if (!digits.empty()) {
      ids.push_back(std::stoll(digits));
      digits.clear();
    }
  }
  return ids;
}

const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "fp32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "fp16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    default: return "another type";
  }
}

double Ms(std::chrono::steady_clock::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

// One Optimum decoder with a KV cache, stepped one chunk of token ids at a time.
class Decoder {
 public:
  explicit Decoder(Ort::Session& session) : session_(session) {
    Ort::AllocatorWithDefaultOptions alloc;
    const size_t n_in = session.GetInputCount();
    for (size_t i = 0; i < n_in; ++i) {
      std::string name = session.GetInputNameAllocated(i, alloc).get();
      auto type_info = session.GetInputTypeInfo(i);
      auto info = type_info.GetTensorTypeAndShapeInfo();
      ONNXTensorElementDataType type = info.GetElementType();
      input_names_.push_back(name);
      if (name == "input_ids") {
        ids_type_ = RequireInt(name, type);
      } else if (name == "attention_mask") {
        mask_type_ = RequireInt(name, type);
      } else if (name == "position_ids") {
        pos_type_ = RequireInt(name, type);
        has_position_ids_ = true;
      } else if (name.rfind("past_key_values.", 0) == 0) {
        if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
          throw std::runtime_error("input " + name + " is " + TypeName(type) + "; expected fp32 or fp16");
        if (!past_.empty() && type != kv_type_) throw std::runtime_error("the KV-cache inputs mix fp32 and fp16");
        kv_type_ = type;
        past_.push_back({name, EmptyCacheShape(info), "present." + name.substr(std::string("past_key_values.").size())});
      } else {
        throw std::runtime_error("unsupported model input '" + name +
                                 "': expected an Optimum text-generation-with-past decoder (input_ids, "
                                 "attention_mask, [position_ids,] past_key_values.N.key/value)");
      }
    }
    if (ids_type_ == ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED || mask_type_ == ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED)
      throw std::runtime_error("the model has no input_ids or no attention_mask input");
    if (past_.empty()) throw std::runtime_error("the model has no past_key_values inputs: it was exported without a KV cache");

    std::vector<std::string> outputs;
    for (size_t i = 0; i < session.GetOutputCount(); ++i) {
      outputs.push_back(session.GetOutputNameAllocated(i, alloc).get());
      if (outputs.back() == "logits") {
        auto type_info = session.GetOutputTypeInfo(i);
        auto info = type_info.GetTensorTypeAndShapeInfo();
        logits_type_ = info.GetElementType();
        auto shape = info.GetShape();
        if (shape.size() == 3 && shape[2] > 0) vocab_ = shape[2];
      }
    }
    if (logits_type_ != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && logits_type_ != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16)
      throw std::runtime_error("the model has no fp32 or fp16 'logits' output");
    output_names_.push_back("logits");
    for (const auto& p : past_) {
      if (std::find(outputs.begin(), outputs.end(), p.present_name) == outputs.end())
        throw std::runtime_error("input " + p.name + " has no matching output " + p.present_name);
      output_names_.push_back(p.present_name);
    }
    for (const auto& n : input_names_) input_ptrs_.push_back(n.c_str());
    for (const auto& n : output_names_) output_ptrs_.push_back(n.c_str());
    Reset();
  }

  void Reset() {
    Ort::AllocatorWithDefaultOptions alloc;
    cache_.clear();
    for (const auto& p : past_) cache_.push_back(Ort::Value::CreateTensor(alloc, p.empty_shape.data(), p.empty_shape.size(), kv_type_));
    length_ = 0;
  }

  // Feeds `ids` after everything fed so far; returns the argmax of the last position's logits.
  int64_t Step(const std::vector<int64_t>& ids) {
    const int64_t n = static_cast<int64_t>(ids.size());
    std::vector<int64_t> mask(length_ + n, 1), positions(n);
    for (int64_t i = 0; i < n; ++i) positions[i] = length_ + i;
    std::vector<Ort::Value> feeds;
    size_t next_past = 0;
    for (const auto& name : input_names_) {
      if (name == "input_ids") {
        feeds.push_back(IntTensor(ids_type_, ids));
      } else if (name == "attention_mask") {
        feeds.push_back(IntTensor(mask_type_, mask));
      } else if (name == "position_ids") {
        feeds.push_back(IntTensor(pos_type_, positions));
      } else {
        feeds.push_back(std::move(cache_[next_past++]));
      }
    }
    auto outputs = session_.Run(Ort::RunOptions{nullptr}, input_ptrs_.data(), feeds.data(), feeds.size(),
                                output_ptrs_.data(), output_ptrs_.size());
    for (size_t i = 0; i < past_.size(); ++i) cache_[i] = std::move(outputs[i + 1]);
    length_ += n;
    return ArgmaxLast(outputs[0]);
  }

  int64_t vocab() const { return vocab_; }
  bool has_position_ids() const { return has_position_ids_; }
  size_t cache_tensors() const { return past_.size(); }
  ONNXTensorElementDataType kv_type() const { return kv_type_; }
  ONNXTensorElementDataType logits_type() const { return logits_type_; }

 private:
  struct Past {
    std::string name;
    std::vector<int64_t> empty_shape;
    std::string present_name;
  };

  static ONNXTensorElementDataType RequireInt(const std::string& name, ONNXTensorElementDataType type) {
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 && type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32)
      throw std::runtime_error("input " + name + " is " + TypeName(type) + "; expected int64 or int32");
    return type;
  }

  // [batch_size, heads, past_sequence_length, head_dim] -> [1, heads, 0, head_dim]: the batch axis
  // is 1, every other symbolic axis (the past length) 0, fixed axes as they are.
  static std::vector<int64_t> EmptyCacheShape(const Ort::ConstTensorTypeAndShapeInfo& info) {
    std::vector<int64_t> shape = info.GetShape();
    std::vector<const char*> symbols(shape.size(), nullptr);
    info.GetSymbolicDimensions(symbols.data(), symbols.size());
    for (size_t d = 0; d < shape.size(); ++d) {
      if (shape[d] >= 0) continue;
      const bool batch = (symbols[d] && std::string(symbols[d]) == "batch_size") || d == 0;
      shape[d] = batch ? 1 : 0;
    }
    return shape;
  }

  static Ort::Value IntTensor(ONNXTensorElementDataType type, const std::vector<int64_t>& values) {
    Ort::AllocatorWithDefaultOptions alloc;
    const int64_t shape[2] = {1, static_cast<int64_t>(values.size())};
    if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64) {
      auto v = Ort::Value::CreateTensor<int64_t>(alloc, shape, 2);
      std::copy(values.begin(), values.end(), v.GetTensorMutableData<int64_t>());
      return v;
    }
    auto v = Ort::Value::CreateTensor<int32_t>(alloc, shape, 2);
    std::transform(values.begin(), values.end(), v.GetTensorMutableData<int32_t>(),
                   [](int64_t x) { return static_cast<int32_t>(x); });
    return v;
  }

  // The first maximum of logits[0, -1, :], as numpy.argmax picks it.
  int64_t ArgmaxLast(const Ort::Value& logits) const {
    auto shape = logits.GetTensorTypeAndShapeInfo().GetShape();
    if (shape.size() != 3 || shape[0] != 1 || shape[1] < 1 || shape[2] < 1)
      throw std::runtime_error("unexpected logits shape");
    const int64_t vocab = shape[2];
    const size_t offset = static_cast<size_t>((shape[1] - 1) * vocab);
    int64_t best = 0;
    if (logits_type_ == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
      const Ort::Float16_t* row = logits.GetTensorData<Ort::Float16_t>() + offset;
      float best_value = row[0].ToFloat();
      for (int64_t v = 1; v < vocab; ++v) {
        const float x = row[v].ToFloat();
        if (x > best_value) best_value = x, best = v;
      }
    } else {
      const float* row = logits.GetTensorData<float>() + offset;
      for (int64_t v = 1; v < vocab; ++v)
        if (row[v] > row[best]) best = v;
    }
    return best;
  }

  Ort::Session& session_;
  std::vector<std::string> input_names_, output_names_;
  std::vector<const char*> input_ptrs_, output_ptrs_;
  std::vector<Past> past_;
  std::vector<Ort::Value> cache_;
  ONNXTensorElementDataType ids_type_ = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  ONNXTensorElementDataType mask_type_ = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  ONNXTensorElementDataType pos_type_ = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  ONNXTensorElementDataType kv_type_ = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  ONNXTensorElementDataType logits_type_ = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  bool has_position_ids_ = false;
  int64_t vocab_ = -1;
  int64_t length_ = 0;
};

std::string Join(const std::vector<int64_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? " " : "") + std::to_string(ids[i]);
  return s;
}

int Run(const Args& args) {
  if (!IsDir(args.dir)) throw std::runtime_error(args.dir + " is not a folder (expected an sqllm-onnx export folder)");
  const std::string model = args.dir + "/model.onnx";
  if (!IsFile(model))
    throw std::runtime_error(args.dir + " holds no model.onnx (is it an sqllm-onnx export folder?)");
  if (!IsFile(args.ops_library))
    throw std::runtime_error("op library " + args.ops_library + " not found (pass --ops-library PATH)");

  std::vector<int64_t> eos = args.eos;
  if (!args.eos_given && !args.ignore_eos) {
    bool found = false;
    eos = ReadEos(args.dir + "/generation_config.json", found);
    if (!found) eos = ReadEos(args.dir + "/config.json", found);
  }
  if (args.ignore_eos) eos.clear();

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "sqllm_generate");
  Ort::SessionOptions options;
  options.SetIntraOpNumThreads(static_cast<int>(args.threads));
  // RegisterCustomOpsLibrary_V2: ONNX Runtime loads the library and keeps it for the session's life.
  Ort::ThrowOnError(Ort::GetApi().RegisterCustomOpsLibrary_V2(options, args.ops_library.c_str()));
  Ort::Session session(env, model.c_str(), options);
  Decoder decoder(session);

  for (int64_t id : args.prompt)
    if (decoder.vocab() > 0 && id >= decoder.vocab())
      throw UsageError("token id " + std::to_string(id) + " is out of range (vocabulary size " +
                       std::to_string(decoder.vocab()) + ")");

  std::printf("model: %s (KV cache %s, logits %s, %zu cache tensors, position_ids: %s), ONNX Runtime %s\n",
              model.c_str(), TypeName(decoder.kv_type()), TypeName(decoder.logits_type()), decoder.cache_tensors(),
              decoder.has_position_ids() ? "yes" : "no", Ort::GetVersionString().c_str());
  std::printf("prompt: %s\n", Join(args.prompt).c_str());

  using clock = std::chrono::steady_clock;
  std::vector<int64_t> generated;
  auto t0 = clock::now();
  int64_t token = decoder.Step(args.prompt);
  const double prefill_ms = Ms(clock::now() - t0);
  generated.push_back(token);
  auto t1 = clock::now();
  while (static_cast<long>(generated.size()) < args.max_new_tokens &&
         std::find(eos.begin(), eos.end(), token) == eos.end()) {
    token = decoder.Step({token});
    generated.push_back(token);
  }
  const double decode_ms = Ms(clock::now() - t1);
  const size_t steps = generated.size() - 1;

  std::printf("tokens: %s\n", Join(generated).c_str());
  std::printf("prefill: %zu prompt tokens in %.3f ms (%.3f ms/token)\n", args.prompt.size(), prefill_ms,
              prefill_ms / static_cast<double>(args.prompt.size()));
  if (steps > 0)
    std::printf("decode: %zu new tokens after the first, %.3f ms/token\n", steps, decode_ms / static_cast<double>(steps));
  else
    std::printf("decode: no step after the prefill\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = ParseArgs(argc, argv);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "sqllm_generate: %s\n\n%s", e.what(), kUsage);
    return 2;
  }
  const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  if (!api) {
    std::fprintf(stderr, "sqllm_generate: built for ONNX Runtime API %d (onnxruntime >= 1.%d) but loaded onnxruntime %s\n",
                 ORT_API_VERSION, ORT_API_VERSION, OrtGetApiBase()->GetVersionString());
    return 1;
  }
  Ort::InitApi(api);
  try {
    return Run(args);
  } catch (const UsageError& e) {
    std::fprintf(stderr, "sqllm_generate: %s\n", e.what());
    return 2;
  } catch (const Ort::Exception& e) {
    std::fprintf(stderr, "sqllm_generate: ONNX Runtime error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sqllm_generate: error: %s\n", e.what());
    return 1;
  }
}
