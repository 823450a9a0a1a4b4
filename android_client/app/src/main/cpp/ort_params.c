// JNI shim: ORT training C API calls that ORT's Java API (1.19.2) does not expose.
// Built by app/build.gradle.kts (CMake) against the headers and libonnxruntime.so of the
// onnxruntime-training-android 1.19.2 AAR. NOT compiled in this repository's CI (no Android NDK).
#include <jni.h>
#include <stdbool.h>
#include "onnxruntime_c_api.h"
#include "onnxruntime_training_c_api.h"

static const OrtApi* api(void) { return OrtGetApiBase()->GetApi(ORT_API_VERSION); }
static const OrtTrainingApi* tapi(void) { return api()->GetTrainingApi(ORT_API_VERSION); }

static bool check(JNIEnv* env, OrtStatus* st) {
  if (st == NULL) return true;
  jclass ex = (*env)->FindClass(env, "java/lang/IllegalStateException");
  (*env)->ThrowNew(env, ex, api()->GetErrorMessage(st));
  api()->ReleaseStatus(st);
  return false;
}

JNIEXPORT jlong JNICALL Java_dev_xpertfl_app_OrtParams_nativeSize(JNIEnv* env, jobject self, jlong session, jboolean trainable) {
  size_t n = 0;
  check(env, tapi()->GetParametersSize((OrtTrainingSession*)session, &n, trainable));
  return (jlong)n;
}

static OrtValue* wrap(JNIEnv* env, jobject buffer, jlong count) {
  float* data = (float*)(*env)->GetDirectBufferAddress(env, buffer);
  OrtMemoryInfo* info = NULL;
  OrtValue* value = NULL;
  int64_t shape[1] = {count};
  if (!check(env, api()->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &info))) return NULL;
  bool ok = check(env, api()->CreateTensorWithDataAsOrtValue(info, data, (size_t)count * sizeof(float), shape, 1,
                                                             ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &value));
  api()->ReleaseMemoryInfo(info);
  return ok ? value : NULL;
}

JNIEXPORT void JNICALL Java_dev_xpertfl_app_OrtParams_nativeCopyBufferToParameters(JNIEnv* env, jobject self, jlong session,
                                                                                  jobject buffer, jlong count, jboolean trainable) {
  OrtValue* v = wrap(env, buffer, count);
  if (v == NULL) return;
  check(env, tapi()->CopyBufferToParameters((OrtTrainingSession*)session, v, trainable));
  api()->ReleaseValue(v);
}

JNIEXPORT void JNICALL Java_dev_xpertfl_app_OrtParams_nativeCopyParametersToBuffer(JNIEnv* env, jobject self, jlong session,
                                                                                  jobject buffer, jlong count, jboolean trainable) {
  OrtValue* v = wrap(env, buffer, count);
  if (v == NULL) return;
  check(env, tapi()->CopyParametersToBuffer((OrtTrainingSession*)session, v, trainable));
  api()->ReleaseValue(v);
}
