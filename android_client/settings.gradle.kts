// Android build of the XPerT device (not built in this repository's CI: needs the Android SDK and
// Google's Maven). Run `make -C android_client proto` first: it generates the Flower protobuf
// classes into build/gen, which app/ compiles together with lib/src/main/java.
pluginManagement {
    repositories { google(); mavenCentral(); gradlePluginPortal() }
}
dependencyResolutionManagement {
    repositories { google(); mavenCentral() }
}
rootProject.name = "xpert-android"
include(":app")
